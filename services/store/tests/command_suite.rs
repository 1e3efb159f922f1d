//! The behaviour every [`CommandStore`] backend must have, written once and run on SQLite and PostgreSQL.

use std::time::{Duration, SystemTime};

use smartfarm_core::Error;
use smartfarm_core::time::from_unix_micros;
use smartfarm_store::Database;
use smartfarm_store::commands::{CommandFilter, CommandInserted, CommandReceipt, CommandStatus, StoredCommand};
use smartfarm_store::testing::TestDatabase as Harness;
use uuid::Uuid;

const EXPIRED_DETAIL: &str = "the ttl passed before the device acknowledged it";

fn at(seconds: u64) -> SystemTime {
    from_unix_micros(1_780_012_800_000_000) + Duration::from_secs(seconds)
}

async fn farm(database: &Database, name: &str) -> Uuid {
    database.registry().create_farm(Uuid::now_v7(), name, at(0)).await.unwrap().id
}

/// A command as a service hands it to storage: queued, created at `created`, expiring at `expires` (seconds).
fn command(farm_id: Uuid, device_id: Uuid, request_id: Option<&str>, created: u64, expires: u64) -> StoredCommand {
    StoredCommand {
        id: Uuid::now_v7(),
        farm_id,
        device_id,
        name: "open_valve".into(),
        parameters: r#"{"valve":"north","seconds":30}"#.into(),
        request_id: request_id.map(str::to_string),
        create_time: at(created),
        expire_time: at(expires),
        status: CommandStatus::Queued,
        status_detail: String::new(),
        history: Vec::new(),
    }
}

fn queued(mut command: StoredCommand) -> StoredCommand {
    command.history = vec![CommandReceipt {
        status: CommandStatus::Queued,
        detail: command.status_detail.clone(),
        change_time: command.create_time,
    }];
    command
}

async fn insert(database: &Database, command: &StoredCommand) -> StoredCommand {
    match database.commands().insert_command(command).await.unwrap() {
        CommandInserted::Created(stored) => stored,
        CommandInserted::Existing(existing) => panic!("expected a new command, found {existing:?}"),
    }
}

fn ids(commands: &[StoredCommand]) -> Vec<Uuid> {
    commands.iter().map(|command| command.id).collect()
}

async fn a_request_id_is_a_commands_idempotency_key_per_device(database: &Database) {
    let store = database.commands();
    let farm_id = farm(database, "alpha").await;
    let (device, other_device) = (Uuid::now_v7(), Uuid::now_v7());

    let first = command(farm_id, device, Some("req-1"), 10, 100);
    let created = store.insert_command(&first).await.unwrap();
    assert_eq!(created, CommandInserted::Created(queued(first.clone())), "queued, with its one receipt");
    assert_eq!(store.get_command(first.id).await.unwrap(), queued(first.clone()));

    let mut retry = command(farm_id, device, Some("req-1"), 12, 200);
    retry.parameters = r#"{"valve":"south"}"#.into();
    assert_eq!(
        store.insert_command(&retry).await.unwrap(),
        CommandInserted::Existing(queued(first.clone())),
        "a retry gets the command it created"
    );
    assert!(matches!(store.get_command(retry.id).await, Err(Error::NotFound { resource: "command", .. })));
    store.update_command_status(first.id, CommandStatus::Sent, "sent to the agent", at(11)).await.unwrap();
    let CommandInserted::Existing(existing) = store.insert_command(&retry).await.unwrap() else {
        panic!("a retry after a status change is still the same command")
    };
    assert_eq!((existing.id, existing.status, existing.history.len()), (first.id, CommandStatus::Sent, 2));

    insert(database, &command(farm_id, other_device, Some("req-1"), 13, 100)).await;
    insert(database, &command(farm_id, device, None, 14, 100)).await;
    insert(database, &command(farm_id, device, None, 15, 100)).await;
    assert_eq!(store.list_commands(&CommandFilter::default(), None, 10).await.unwrap().len(), 4);

    let lost = store.insert_command(&command(Uuid::now_v7(), device, Some("req-2"), 16, 100)).await.unwrap_err();
    assert!(matches!(lost, Error::NotFound { resource: "farm", .. }), "{lost:?}");
    let mut same_id = command(farm_id, device, None, 17, 100);
    same_id.id = first.id;
    assert!(matches!(store.insert_command(&same_id).await, Err(Error::AlreadyExists(_))));
    assert!(matches!(store.get_command(Uuid::now_v7()).await, Err(Error::NotFound { resource: "command", .. })));
}

async fn status_only_moves_forward_and_keeps_its_history(database: &Database) {
    let store = database.commands();
    let farm_id = farm(database, "bravo").await;
    let sent = insert(database, &command(farm_id, Uuid::now_v7(), None, 10, 100)).await;

    let after = store.update_command_status(sent.id, CommandStatus::Sent, "sent to the agent", at(11)).await.unwrap();
    let after = after.expect("queued may become sent");
    assert_eq!((after.status, after.status_detail.as_str()), (CommandStatus::Sent, "sent to the agent"));
    let delivered = store.update_command_status(sent.id, CommandStatus::Delivered, "on the device", at(12)).await;
    assert_eq!(delivered.unwrap().map(|command| command.status), Some(CommandStatus::Delivered));

    let stale = store.update_command_status(sent.id, CommandStatus::Sent, "sent again", at(13)).await.unwrap();
    assert_eq!(stale, None, "a late sent after delivered is stale");
    let unchanged = store.get_command(sent.id).await.unwrap();
    assert_eq!((unchanged.status, unchanged.history.len()), (CommandStatus::Delivered, 3));

    let acked = store.update_command_status(sent.id, CommandStatus::Acked, "valve open", at(14)).await.unwrap();
    let acked = acked.expect("delivered may become acked");
    assert_eq!(
        acked.history,
        vec![
            CommandReceipt { status: CommandStatus::Queued, detail: String::new(), change_time: at(10) },
            CommandReceipt { status: CommandStatus::Sent, detail: "sent to the agent".into(), change_time: at(11) },
            CommandReceipt { status: CommandStatus::Delivered, detail: "on the device".into(), change_time: at(12) },
            CommandReceipt { status: CommandStatus::Acked, detail: "valve open".into(), change_time: at(14) },
        ],
        "oldest first"
    );
    for next in [CommandStatus::Acked, CommandStatus::Failed, CommandStatus::Expired, CommandStatus::Delivered] {
        let refused = store.update_command_status(sent.id, next, "too late", at(15)).await.unwrap();
        assert_eq!(refused, None, "nothing after acked, not even {next:?}");
    }
    assert_eq!(store.get_command(sent.id).await.unwrap(), acked);

    let skipped = insert(database, &command(farm_id, Uuid::now_v7(), None, 20, 100)).await;
    let queued_again = store.update_command_status(skipped.id, CommandStatus::Queued, "again", at(21)).await;
    assert_eq!(queued_again.unwrap(), None);
    let failed = store.update_command_status(skipped.id, CommandStatus::Failed, "no such valve", at(22)).await;
    let failed = failed.unwrap().expect("a status may be skipped");
    assert_eq!(
        (failed.status, failed.status_detail.as_str(), failed.history.len()),
        (CommandStatus::Failed, "no such valve", 2)
    );

    let missing = store.update_command_status(Uuid::now_v7(), CommandStatus::Sent, "", at(23)).await.unwrap_err();
    assert!(matches!(missing, Error::NotFound { resource: "command", .. }), "{missing:?}");
}

async fn pending_commands_are_unfinished_and_unexpired_and_expiry_finishes_them(database: &Database) {
    let store = database.commands();
    let (farm_a, farm_b) = (farm(database, "charlie").await, farm(database, "delta").await);
    let device = Uuid::now_v7();
    let queued_early = insert(database, &command(farm_a, device, None, 10, 100)).await;
    let queued_short = insert(database, &command(farm_a, device, None, 20, 50)).await;
    let sent = insert(database, &command(farm_a, device, None, 30, 200)).await;
    store.update_command_status(sent.id, CommandStatus::Sent, "sent", at(31)).await.unwrap();
    let delivered = insert(database, &command(farm_a, device, None, 40, 300)).await;
    store.update_command_status(delivered.id, CommandStatus::Delivered, "delivered", at(41)).await.unwrap();
    let acked = insert(database, &command(farm_a, device, None, 5, 60)).await;
    store.update_command_status(acked.id, CommandStatus::Acked, "done", at(6)).await.unwrap();
    let on_b = insert(database, &command(farm_b, Uuid::now_v7(), None, 15, 100)).await;

    let pending = store.pending_commands(farm_a, at(49)).await.unwrap();
    assert_eq!(ids(&pending), vec![queued_early.id, queued_short.id, sent.id, delivered.id], "oldest first");
    assert_eq!(pending[2].history.len(), 2, "with their history");
    let pending = store.pending_commands(farm_a, at(50)).await.unwrap();
    assert_eq!(ids(&pending), vec![queued_early.id, sent.id, delivered.id], "expired at its expire time");
    assert_eq!(ids(&store.pending_commands(farm_b, at(50)).await.unwrap()), vec![on_b.id]);

    let expired = store.expire_commands(at(100), at(100)).await.unwrap();
    assert_eq!(ids(&expired), vec![queued_early.id, on_b.id, queued_short.id]);
    for command in &expired {
        assert_eq!((command.status, command.status_detail.as_str()), (CommandStatus::Expired, EXPIRED_DETAIL));
        assert_eq!(
            command.history.last(),
            Some(&CommandReceipt {
                status: CommandStatus::Expired,
                detail: EXPIRED_DETAIL.into(),
                change_time: at(100)
            })
        );
        assert_eq!(&store.get_command(command.id).await.unwrap(), command);
    }
    assert!(store.expire_commands(at(100), at(100)).await.unwrap().is_empty(), "expired once");
    assert_eq!(ids(&store.pending_commands(farm_a, at(100)).await.unwrap()), vec![sent.id, delivered.id]);
    assert!(
        store.expire_commands(at(250), at(100)).await.unwrap().is_empty(),
        "a sent command past its expire time waits for the agent's report, as a delivered one does"
    );
    assert_eq!(
        ids(&store.pending_commands(farm_a, at(250)).await.unwrap()),
        vec![sent.id, delivered.id],
        "and goes to a reconnecting agent, which answers for it"
    );

    let expired = store.expire_commands(at(1000), at(299)).await.unwrap();
    assert_eq!(ids(&expired), vec![sent.id], "sent commands once the grace for the agent's report passed");
    let expired = store.expire_commands(at(1000), at(300)).await.unwrap();
    assert_eq!(ids(&expired), vec![delivered.id], "delivered ones once the grace for the agent's report passed");
    assert_eq!(
        expired[0].history.iter().map(|receipt| receipt.status).collect::<Vec<_>>(),
        vec![CommandStatus::Queued, CommandStatus::Delivered, CommandStatus::Expired]
    );
    assert_eq!(store.get_command(acked.id).await.unwrap().status, CommandStatus::Acked, "final stays final");
    assert!(store.pending_commands(farm_a, at(0)).await.unwrap().is_empty());
    let late_ack = store.update_command_status(sent.id, CommandStatus::Acked, "late", at(1001)).await.unwrap();
    assert_eq!(late_ack, None, "an ack after expiry is stale");
}

async fn commands_are_listed_newest_first_by_filter_and_keyset(database: &Database) {
    let store = database.commands();
    let (farm_a, farm_b) = (farm(database, "echo").await, farm(database, "foxtrot").await);
    let (pump, valve) = (Uuid::now_v7(), Uuid::now_v7());
    let first = insert(database, &command(farm_a, pump, None, 10, 1000)).await;
    let second = insert(database, &command(farm_a, valve, None, 20, 1000)).await;
    let third = insert(database, &command(farm_a, pump, None, 30, 1000)).await;
    let elsewhere = insert(database, &command(farm_b, Uuid::now_v7(), None, 25, 1000)).await;
    // Two commands created in the same microsecond: the id breaks the tie (v7 ids grow).
    let tied_low = insert(database, &command(farm_a, pump, None, 40, 1000)).await;
    let tied_high = insert(database, &command(farm_a, pump, None, 40, 1000)).await;
    assert!(tied_low.id < tied_high.id);
    let second = store.update_command_status(second.id, CommandStatus::Sent, "sent", at(21)).await.unwrap().unwrap();

    let every = CommandFilter::default();
    assert_eq!(
        ids(&store.list_commands(&every, None, 10).await.unwrap()),
        vec![tied_high.id, tied_low.id, third.id, elsewhere.id, second.id, first.id]
    );
    let on_a = CommandFilter { farm_id: Some(farm_a), ..Default::default() };
    let page = store.list_commands(&on_a, None, 2).await.unwrap();
    assert_eq!(ids(&page), vec![tied_high.id, tied_low.id]);
    let page = store.list_commands(&on_a, Some((tied_high.create_time, tied_high.id)), 2).await.unwrap();
    assert_eq!(ids(&page), vec![tied_low.id, third.id], "strictly after the key, through a tie");
    let page = store.list_commands(&on_a, Some((third.create_time, third.id)), 2).await.unwrap();
    assert_eq!(page, vec![second.clone(), first.clone()], "each with its history");
    assert!(store.list_commands(&on_a, Some((first.create_time, first.id)), 2).await.unwrap().is_empty());

    let pump_only = CommandFilter { device_id: Some(pump), ..Default::default() };
    assert_eq!(
        ids(&store.list_commands(&pump_only, None, 10).await.unwrap()),
        vec![tied_high.id, tied_low.id, third.id, first.id]
    );
    let sent_only = CommandFilter { status: Some(CommandStatus::Sent), ..Default::default() };
    assert_eq!(store.list_commands(&sent_only, None, 10).await.unwrap(), vec![second]);
    let queued_on_b = CommandFilter { farm_id: Some(farm_b), status: Some(CommandStatus::Queued), device_id: None };
    assert_eq!(ids(&store.list_commands(&queued_on_b, None, 10).await.unwrap()), vec![elsewhere.id]);
    let nobody = CommandFilter { farm_id: Some(farm_b), device_id: Some(pump), status: None };
    assert!(store.list_commands(&nobody, None, 10).await.unwrap().is_empty());
}

/// Receipts racing for one command: exactly one of each competing change wins, and the history stays in order.
async fn concurrent_receipts_for_one_command_apply_once(database: &Database) {
    let store = database.commands();
    let farm_id = farm(database, "golf").await;
    let target = insert(database, &command(farm_id, Uuid::now_v7(), None, 10, 1000)).await.id;
    let mut updates = tokio::task::JoinSet::new();
    for index in 0..12u64 {
        let store = store.clone();
        let status = [CommandStatus::Sent, CommandStatus::Delivered, CommandStatus::Acked][index as usize % 3];
        updates.spawn(async move {
            store.update_command_status(target, status, &format!("receipt {index}"), at(20 + index)).await.unwrap()
        });
    }
    let applied = updates.join_all().await.into_iter().flatten().count();
    let stored = store.get_command(target).await.unwrap();
    assert_eq!(stored.status, CommandStatus::Acked, "an ack always lands: nothing outranks it");
    assert_eq!(stored.history.len(), applied + 1, "one receipt per applied change");
    let ranks: Vec<CommandStatus> = stored.history.iter().map(|receipt| receipt.status).collect();
    for pair in ranks.windows(2) {
        assert!(pair[0].may_become(pair[1]), "the history only moves forward: {ranks:?}");
    }
}

async fn finished_commands_past_retention_are_deleted_with_their_history(database: &Database) {
    let store = database.commands();
    let farm_id = farm(database, "echo").await;
    let device = Uuid::now_v7();
    let finish = |status: CommandStatus| async move {
        let command = insert(database, &command(farm_id, device, Some(&format!("{status:?}")), 10, 500)).await;
        store_status(database, command.id, status).await;
        command
    };
    // Old and finished, each way a command finishes; old and unfinished; finished but recent.
    let acked = finish(CommandStatus::Acked).await;
    let failed = finish(CommandStatus::Failed).await;
    let expired = finish(CommandStatus::Expired).await;
    let queued_old = insert(database, &command(farm_id, device, None, 5, 500)).await;
    let delivered_old = insert(database, &command(farm_id, device, None, 6, 500)).await;
    store_status(database, delivered_old.id, CommandStatus::Delivered).await;
    let acked_recent = insert(database, &command(farm_id, device, None, 200, 500)).await;
    store_status(database, acked_recent.id, CommandStatus::Acked).await;

    assert_eq!(store.delete_finished_commands(at(100), 2).await.unwrap(), 2, "at most the limit");
    assert_eq!(store.delete_finished_commands(at(100), 2).await.unwrap(), 1);
    assert_eq!(store.delete_finished_commands(at(100), 2).await.unwrap(), 0);
    for gone in [&acked, &failed, &expired] {
        let error = store.get_command(gone.id).await.unwrap_err();
        assert!(matches!(error, Error::NotFound { resource: "command", .. }), "{error:?}");
    }
    for kept in [&queued_old, &delivered_old, &acked_recent] {
        assert_eq!(store.get_command(kept.id).await.unwrap().id, kept.id, "unfinished or recent commands stay");
    }
    let filter = CommandFilter { farm_id: Some(farm_id), ..Default::default() };
    let listed = store.list_commands(&filter, None, 100).await.unwrap();
    assert_eq!(listed.len(), 3, "deleted commands are not listed");
    // The request id of a deleted command is free again: the same request makes a new command.
    let again = command(farm_id, device, Some("Acked"), 300, 500);
    assert!(matches!(store.insert_command(&again).await.unwrap(), CommandInserted::Created(_)));
}

/// Moves a command straight to `status` (a status may be skipped).
async fn store_status(database: &Database, id: Uuid, status: CommandStatus) {
    let changed = database.commands().update_command_status(id, status, "", at(50)).await.unwrap();
    assert_eq!(changed.map(|command| command.status), Some(status));
}

macro_rules! command_suite {
    ($backend:ident) => {
        mod $backend {
            use super::*;

            #[tokio::test]
            async fn a_request_id_is_a_commands_idempotency_key_per_device() {
                super::a_request_id_is_a_commands_idempotency_key_per_device(&Harness::$backend().await.database).await;
            }

            #[tokio::test]
            async fn status_only_moves_forward_and_keeps_its_history() {
                super::status_only_moves_forward_and_keeps_its_history(&Harness::$backend().await.database).await;
            }

            #[tokio::test]
            async fn pending_commands_are_unfinished_and_unexpired_and_expiry_finishes_them() {
                super::pending_commands_are_unfinished_and_unexpired_and_expiry_finishes_them(
                    &Harness::$backend().await.database,
                )
                .await;
            }

            #[tokio::test]
            async fn commands_are_listed_newest_first_by_filter_and_keyset() {
                super::commands_are_listed_newest_first_by_filter_and_keyset(&Harness::$backend().await.database).await;
            }

            #[tokio::test]
            async fn finished_commands_past_retention_are_deleted_with_their_history() {
                super::finished_commands_past_retention_are_deleted_with_their_history(
                    &Harness::$backend().await.database,
                )
                .await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn concurrent_receipts_for_one_command_apply_once() {
                super::concurrent_receipts_for_one_command_apply_once(&Harness::$backend().await.database).await;
            }
        }
    };
}

command_suite!(sqlite);
command_suite!(postgres);

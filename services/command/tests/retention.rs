//! The command role's retention: finished commands older than `command_retention` are deleted, a chunk at a time,
//! and a retention of zero keeps everything.

use std::time::{Duration, SystemTime};

use smartfarm_bus::Bus;
use smartfarm_command::CommandApi;
use smartfarm_core::config::AlertsConfig;
use smartfarm_store::commands::{CommandInserted, CommandStatus, StoredCommand};
use smartfarm_store::testing::TestDatabase;
use uuid::Uuid;

const DAY: Duration = Duration::from_secs(86_400);

fn command(farm_id: Uuid, create_time: SystemTime) -> StoredCommand {
    StoredCommand {
        id: Uuid::now_v7(),
        farm_id,
        device_id: Uuid::now_v7(),
        name: "open_valve".into(),
        parameters: "{}".into(),
        request_id: None,
        create_time,
        expire_time: create_time + Duration::from_secs(60),
        status: CommandStatus::Queued,
        status_detail: String::new(),
        history: Vec::new(),
    }
}

#[tokio::test]
async fn finished_commands_older_than_the_retention_are_deleted() {
    let test = TestDatabase::sqlite().await;
    let store = test.database.commands();
    let now = SystemTime::now();
    let farm_id = test.database.registry().create_farm(Uuid::now_v7(), "retention", now - 100 * DAY).await.unwrap().id;
    // More old finished commands than one chunk holds would take long here; the chunking is the store's limit,
    // covered by the store suite. Three old acknowledged, one old still queued, one recent acknowledged.
    let mut old_acked = Vec::new();
    for age in [95, 92, 91] {
        old_acked.push(finished(&store, command(farm_id, now - age * DAY)).await);
    }
    let CommandInserted::Created(old_queued) = store.insert_command(&command(farm_id, now - 95 * DAY)).await.unwrap()
    else {
        panic!("a new command")
    };
    let recent = finished(&store, command(farm_id, now - 89 * DAY)).await;

    let keep_forever = AlertsConfig { command_retention: Duration::ZERO, ..AlertsConfig::default() };
    let api = CommandApi::new(test.database.registry(), store.clone(), Bus::in_process(), keep_forever);
    assert_eq!(api.apply_retention(now).await.unwrap(), 0, "a retention of zero keeps every command");

    let ninety_days = AlertsConfig { command_retention: 90 * DAY, ..AlertsConfig::default() };
    let api = CommandApi::new(test.database.registry(), store.clone(), Bus::in_process(), ninety_days);
    assert_eq!(api.apply_retention(now).await.unwrap(), 3);
    for id in old_acked {
        assert!(store.get_command(id).await.is_err(), "an old finished command is deleted");
    }
    assert_eq!(store.get_command(old_queued.id).await.unwrap().status, CommandStatus::Queued, "unfinished stays");
    assert_eq!(store.get_command(recent).await.unwrap().status, CommandStatus::Acked, "recent stays");
    assert_eq!(api.apply_retention(now).await.unwrap(), 0, "nothing more to delete");
}

async fn finished(store: &std::sync::Arc<dyn smartfarm_store::CommandStore>, command: StoredCommand) -> Uuid {
    store.insert_command(&command).await.unwrap();
    let acked = store.update_command_status(command.id, CommandStatus::Acked, "done", command.create_time).await;
    assert!(acked.unwrap().is_some());
    command.id
}

//! [`CommandStore`] on PostgreSQL. A status change locks its command's row, so two receipts for one command take
//! turns and the forward-only check sees the status the other one left.

use std::collections::HashMap;
use std::time::SystemTime;

use deadpool_postgres::GenericClient;
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use smartfarm_core::{Error, Result};

use super::{PostgresStore, is_foreign_key_violation, is_unique_violation, pg_error, sql_count, stored_number};
use crate::commands::{CommandFilter, CommandInserted, CommandReceipt, CommandStatus, CommandStore, StoredCommand};

const COMMAND_COLUMNS: &str =
    "id, farm_id, device_id, name, parameters, request_id, create_time, expire_time, status, status_detail";

/// The receipt detail of a command that expired.
const EXPIRED_DETAIL: &str = "the ttl passed before the device acknowledged it";

/// The final statuses (acked, failed, expired), as the migrations' partial index names them.
const FINISHED: &str = "4, 5, 6";

/// A command row; its history is read separately.
fn command_from_row(row: &Row) -> Result<StoredCommand> {
    Ok(StoredCommand {
        id: row.get(0),
        farm_id: row.get(1),
        device_id: row.get(2),
        name: row.get(3),
        parameters: row.get(4),
        request_id: row.get(5),
        create_time: row.get(6),
        expire_time: row.get(7),
        status: stored_number("commands.status", row.get(8), CommandStatus::from_number)?,
        status_detail: row.get(9),
        history: Vec::new(),
    })
}

/// The commands of `rows`, in their order, each with its history (oldest first), read in one more query.
async fn with_history(client: &impl GenericClient, rows: &[Row]) -> Result<Vec<StoredCommand>> {
    let mut commands = rows.iter().map(command_from_row).collect::<Result<Vec<_>>>()?;
    if commands.is_empty() {
        return Ok(commands);
    }
    let ids: Vec<Uuid> = commands.iter().map(|command| command.id).collect();
    let receipts = client
        .query(
            "SELECT command_id, status, detail, change_time FROM command_receipts
             WHERE command_id = ANY ($1) ORDER BY command_id, position",
            &[&ids],
        )
        .await
        .map_err(pg_error("read command history"))?;
    let mut histories: HashMap<Uuid, Vec<CommandReceipt>> = HashMap::new();
    for row in &receipts {
        histories.entry(row.get(0)).or_default().push(CommandReceipt {
            status: stored_number("command_receipts.status", row.get(1), CommandStatus::from_number)?,
            detail: row.get(2),
            change_time: row.get(3),
        });
    }
    for command in &mut commands {
        command.history = histories.remove(&command.id).unwrap_or_default();
    }
    Ok(commands)
}

async fn load_command(client: &impl GenericClient, id: Uuid) -> Result<Option<StoredCommand>> {
    let rows = client
        .query(&format!("SELECT {COMMAND_COLUMNS} FROM commands WHERE id = $1"), &[&id])
        .await
        .map_err(pg_error("read command"))?;
    Ok(with_history(client, &rows).await?.pop())
}

/// Appends a receipt to each of `ids` (their rows already say `status`).
async fn append_receipts(
    client: &impl GenericClient,
    ids: &[Uuid],
    status: CommandStatus,
    detail: &str,
    at: SystemTime,
) -> Result<()> {
    client
        .execute(
            "INSERT INTO command_receipts (command_id, position, status, detail, change_time)
             SELECT command_id,
                    (SELECT COALESCE(MAX(position), 0) + 1 FROM command_receipts WHERE command_id = changed.command_id),
                    $2, $3, $4
             FROM unnest($1::uuid[]) AS changed (command_id)",
            &[&ids, &(status as i16), &detail, &at],
        )
        .await
        .map_err(pg_error("append command receipts"))?;
    Ok(())
}

#[async_trait::async_trait]
impl CommandStore for PostgresStore {
    async fn insert_command(&self, command: &StoredCommand) -> Result<CommandInserted> {
        let mut command = command.clone();
        command.status = CommandStatus::Queued;
        command.history = vec![CommandReceipt {
            status: CommandStatus::Queued,
            detail: command.status_detail.clone(),
            change_time: command.create_time,
        }];
        let mut client = self.client().await?;
        let transaction = client.transaction().await.map_err(pg_error("begin command insert"))?;
        let status = command.status as i16;
        let inserted = transaction
            .execute(
                &format!("INSERT INTO commands ({COMMAND_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"),
                &[
                    &command.id,
                    &command.farm_id,
                    &command.device_id,
                    &command.name,
                    &command.parameters,
                    &command.request_id,
                    &command.create_time,
                    &command.expire_time,
                    &status,
                    &command.status_detail,
                ],
            )
            .await;
        if let Err(error) = inserted {
            // The failed statement aborted the transaction; look the other command up outside it.
            transaction.rollback().await.map_err(pg_error("roll back command insert"))?;
            if is_foreign_key_violation(&error) {
                return Err(Error::not_found("farm", command.farm_id));
            }
            if !is_unique_violation(&error) {
                return Err(pg_error("insert command")(error));
            }
            let Some(request_id) = &command.request_id else {
                return Err(Error::AlreadyExists(format!("command {} already exists", command.id)));
            };
            let rows = client
                .query(
                    &format!("SELECT {COMMAND_COLUMNS} FROM commands WHERE device_id = $1 AND request_id = $2"),
                    &[&command.device_id, request_id],
                )
                .await
                .map_err(pg_error("read command by request id"))?;
            return match with_history(&client, &rows).await?.pop() {
                Some(existing) => Ok(CommandInserted::Existing(existing)),
                None => Err(Error::AlreadyExists(format!("command {} already exists", command.id))),
            };
        }
        transaction
            .execute(
                "INSERT INTO command_receipts (command_id, position, status, detail, change_time)
                 VALUES ($1, 1, $2, $3, $4)",
                &[&command.id, &status, &command.status_detail, &command.create_time],
            )
            .await
            .map_err(pg_error("insert queued receipt"))?;
        transaction.commit().await.map_err(pg_error("commit command insert"))?;
        Ok(CommandInserted::Created(command))
    }

    async fn get_command(&self, id: Uuid) -> Result<StoredCommand> {
        let client = self.client().await?;
        load_command(&client, id).await?.ok_or_else(|| Error::not_found("command", id))
    }

    async fn list_commands(
        &self,
        filter: &CommandFilter,
        after: Option<(SystemTime, Uuid)>,
        limit: usize,
    ) -> Result<Vec<StoredCommand>> {
        let client = self.client().await?;
        let status = filter.status.map(|status| status as i16);
        let (after_time, after_id) = (after.map(|(time, _)| time), after.map(|(_, id)| id));
        let limit = sql_count(limit);
        let params: [&(dyn ToSql + Sync); 6] =
            [&filter.farm_id, &filter.device_id, &status, &after_time, &after_id, &limit];
        let rows = client
            .query(
                &format!(
                    "SELECT {COMMAND_COLUMNS} FROM commands
                     WHERE ($1::uuid IS NULL OR farm_id = $1)
                       AND ($2::uuid IS NULL OR device_id = $2)
                       AND ($3::smallint IS NULL OR status = $3)
                       AND ($4::timestamptz IS NULL OR (create_time, id) < ($4, $5::uuid))
                     ORDER BY create_time DESC, id DESC LIMIT $6"
                ),
                &params,
            )
            .await
            .map_err(pg_error("list commands"))?;
        with_history(&client, &rows).await
    }

    async fn update_command_status(
        &self,
        id: Uuid,
        status: CommandStatus,
        detail: &str,
        at: SystemTime,
    ) -> Result<Option<StoredCommand>> {
        let mut client = self.client().await?;
        let transaction = client.transaction().await.map_err(pg_error("begin command status update"))?;
        let row = transaction
            .query_opt("SELECT status FROM commands WHERE id = $1 FOR UPDATE", &[&id])
            .await
            .map_err(pg_error("lock command"))?;
        let current = stored_number(
            "commands.status",
            row.ok_or_else(|| Error::not_found("command", id))?.get(0),
            CommandStatus::from_number,
        )?;
        if !current.may_become(status) {
            return Ok(None);
        }
        transaction
            .execute(
                "UPDATE commands SET status = $2, status_detail = $3 WHERE id = $1",
                &[&id, &(status as i16), &detail],
            )
            .await
            .map_err(pg_error("update command status"))?;
        append_receipts(&transaction, &[id], status, detail, at).await?;
        let command = load_command(&transaction, id).await?.expect("the command was found");
        transaction.commit().await.map_err(pg_error("commit command status update"))?;
        Ok(Some(command))
    }

    async fn pending_commands(&self, farm_id: Uuid, now: SystemTime) -> Result<Vec<StoredCommand>> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {COMMAND_COLUMNS} FROM commands
                     WHERE farm_id = $1 AND ((status = $2 AND expire_time > $4) OR status IN ($3, $5))
                     ORDER BY create_time, id"
                ),
                &[
                    &farm_id,
                    &(CommandStatus::Queued as i16),
                    &(CommandStatus::Sent as i16),
                    &now,
                    &(CommandStatus::Delivered as i16),
                ],
            )
            .await
            .map_err(pg_error("list pending commands"))?;
        with_history(&client, &rows).await
    }

    async fn expire_commands(&self, now: SystemTime, unconfirmed_before: SystemTime) -> Result<Vec<StoredCommand>> {
        let mut client = self.client().await?;
        let transaction = client.transaction().await.map_err(pg_error("begin command expiry"))?;
        // An UPDATE re-checks its condition on a row another transaction changed meanwhile: a command acknowledged
        // while this ran is left alone.
        let rows = transaction
            .query(
                "UPDATE commands SET status = $1, status_detail = $2
                 WHERE (status = $3 AND expire_time <= $6) OR (status IN ($4, $5) AND expire_time <= $7)
                 RETURNING id",
                &[
                    &(CommandStatus::Expired as i16),
                    &EXPIRED_DETAIL,
                    &(CommandStatus::Queued as i16),
                    &(CommandStatus::Sent as i16),
                    &(CommandStatus::Delivered as i16),
                    &now,
                    &unconfirmed_before,
                ],
            )
            .await
            .map_err(pg_error("expire commands"))?;
        let ids: Vec<Uuid> = rows.iter().map(|row| row.get(0)).collect();
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        append_receipts(&transaction, &ids, CommandStatus::Expired, EXPIRED_DETAIL, now).await?;
        let rows = transaction
            .query(
                &format!("SELECT {COMMAND_COLUMNS} FROM commands WHERE id = ANY ($1) ORDER BY create_time, id"),
                &[&ids],
            )
            .await
            .map_err(pg_error("read expired commands"))?;
        let expired = with_history(&transaction, &rows).await?;
        transaction.commit().await.map_err(pg_error("commit command expiry"))?;
        Ok(expired)
    }

    async fn delete_finished_commands(&self, created_before: SystemTime, limit: usize) -> Result<u64> {
        let mut client = self.client().await?;
        let transaction = client.transaction().await.map_err(pg_error("begin command retention"))?;
        // A final status never changes again, so what is picked here stays deletable. The statuses are written out
        // so that the planner can use the index of finished commands.
        let rows = transaction
            .query(
                &format!(
                    "SELECT id FROM commands WHERE status IN ({FINISHED}) AND create_time < $1 ORDER BY create_time, id LIMIT $2"
                ),
                &[&created_before, &(limit as i64)],
            )
            .await
            .map_err(pg_error("find finished commands past retention"))?;
        let ids: Vec<Uuid> = rows.iter().map(|row| row.get(0)).collect();
        if ids.is_empty() {
            return Ok(0);
        }
        transaction
            .execute("DELETE FROM command_receipts WHERE command_id = ANY ($1)", &[&ids])
            .await
            .map_err(pg_error("delete the history of old commands"))?;
        let deleted = transaction
            .execute("DELETE FROM commands WHERE id = ANY ($1)", &[&ids])
            .await
            .map_err(pg_error("delete old commands"))?;
        transaction.commit().await.map_err(pg_error("commit command retention"))?;
        Ok(deleted)
    }
}

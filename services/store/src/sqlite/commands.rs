//! [`CommandStore`] on SQLite.

use std::time::SystemTime;

use rusqlite::{Connection, OptionalExtension, Row, params, params_from_iter, types::Value};
use uuid::Uuid;

use smartfarm_core::time::{from_unix_micros, to_unix_micros};
use smartfarm_core::{Error, Result};

use super::registry::uuid_column;
use super::{SqliteStore, is_foreign_key_violation, is_unique_violation, number_column, sql_count, sql_error};
use crate::commands::{CommandFilter, CommandInserted, CommandReceipt, CommandStatus, CommandStore, StoredCommand};

const COMMAND_COLUMNS: &str =
    "id, farm_id, device_id, name, parameters, request_id, create_time, expire_time, status, status_detail";

/// The receipt detail of a command that expired.
const EXPIRED_DETAIL: &str = "the ttl passed before the device acknowledged it";

/// The final statuses (acked, failed, expired), as the migrations' partial index names them.
const FINISHED: &str = "4, 5, 6";

/// A command row; its history is read separately.
fn command_from_row(row: &Row<'_>) -> rusqlite::Result<StoredCommand> {
    Ok(StoredCommand {
        id: uuid_column(row, 0)?,
        farm_id: uuid_column(row, 1)?,
        device_id: uuid_column(row, 2)?,
        name: row.get(3)?,
        parameters: row.get(4)?,
        request_id: row.get(5)?,
        create_time: from_unix_micros(row.get(6)?),
        expire_time: from_unix_micros(row.get(7)?),
        status: number_column(row, 8, CommandStatus::from_number)?,
        status_detail: row.get(9)?,
        history: Vec::new(),
    })
}

fn receipt_from_row(row: &Row<'_>) -> rusqlite::Result<CommandReceipt> {
    Ok(CommandReceipt {
        status: number_column(row, 0, CommandStatus::from_number)?,
        detail: row.get(1)?,
        change_time: from_unix_micros(row.get(2)?),
    })
}

/// Fills in each command's history, oldest first.
fn with_history(connection: &Connection, mut commands: Vec<StoredCommand>) -> Result<Vec<StoredCommand>> {
    let mut statement = connection
        .prepare_cached(
            "SELECT status, detail, change_time FROM command_receipts WHERE command_id = ?1 ORDER BY position",
        )
        .map_err(sql_error("prepare command history"))?;
    for command in &mut commands {
        let rows = statement
            .query_map([command.id.to_string()], receipt_from_row)
            .map_err(sql_error("read command history"))?;
        command.history = rows.collect::<rusqlite::Result<Vec<_>>>().map_err(sql_error("read command receipt"))?;
    }
    Ok(commands)
}

/// Commands chosen by `condition` (over the command columns, with `values`), ordered by `order`, with history.
fn select_commands(
    connection: &Connection,
    condition: &str,
    order: &str,
    values: Vec<Value>,
) -> Result<Vec<StoredCommand>> {
    let mut statement = connection
        .prepare(&format!("SELECT {COMMAND_COLUMNS} FROM commands WHERE {condition} ORDER BY {order}"))
        .map_err(sql_error("prepare command listing"))?;
    let rows = statement.query_map(params_from_iter(values), command_from_row).map_err(sql_error("list commands"))?;
    let commands = rows.collect::<rusqlite::Result<Vec<_>>>().map_err(sql_error("read command row"))?;
    with_history(connection, commands)
}

fn load_command(connection: &Connection, id: Uuid) -> Result<Option<StoredCommand>> {
    Ok(select_commands(connection, "id = ?1", "id", vec![Value::Text(id.to_string())])?.pop())
}

/// Sets a command's status and appends the receipt that says so.
fn change_status(connection: &Connection, id: Uuid, status: CommandStatus, detail: &str, at: SystemTime) -> Result<()> {
    connection
        .execute(
            "UPDATE commands SET status = ?2, status_detail = ?3 WHERE id = ?1",
            params![id.to_string(), status as i64, detail],
        )
        .map_err(sql_error("update command status"))?;
    connection
        .execute(
            "INSERT INTO command_receipts (command_id, position, status, detail, change_time)
             SELECT ?1, COALESCE(MAX(position), 0) + 1, ?2, ?3, ?4 FROM command_receipts WHERE command_id = ?1",
            params![id.to_string(), status as i64, detail, to_unix_micros(at)],
        )
        .map_err(sql_error("append command receipt"))?;
    Ok(())
}

#[async_trait::async_trait]
impl CommandStore for SqliteStore {
    async fn insert_command(&self, command: &StoredCommand) -> Result<CommandInserted> {
        let mut command = command.clone();
        command.status = CommandStatus::Queued;
        command.history = vec![CommandReceipt {
            status: CommandStatus::Queued,
            detail: command.status_detail.clone(),
            change_time: command.create_time,
        }];
        self.run(move |connection| {
            let transaction = connection.transaction().map_err(sql_error("begin command insert"))?;
            let inserted = transaction.execute(
                &format!("INSERT INTO commands ({COMMAND_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"),
                params![
                    command.id.to_string(),
                    command.farm_id.to_string(),
                    command.device_id.to_string(),
                    command.name,
                    command.parameters,
                    command.request_id,
                    to_unix_micros(command.create_time),
                    to_unix_micros(command.expire_time),
                    command.status as i64,
                    command.status_detail,
                ],
            );
            match inserted {
                Ok(_) => {}
                Err(error) if is_foreign_key_violation(&error) => {
                    return Err(Error::not_found("farm", command.farm_id));
                }
                Err(error) if is_unique_violation(&error) => {
                    let existing = match &command.request_id {
                        Some(request_id) => select_commands(
                            &transaction,
                            "device_id = ?1 AND request_id = ?2",
                            "id",
                            vec![Value::Text(command.device_id.to_string()), Value::Text(request_id.clone())],
                        )?
                        .pop(),
                        None => None,
                    };
                    return existing
                        .map(CommandInserted::Existing)
                        .ok_or_else(|| Error::AlreadyExists(format!("command {} already exists", command.id)));
                }
                Err(error) => return Err(sql_error("insert command")(error)),
            }
            transaction
                .execute(
                    "INSERT INTO command_receipts (command_id, position, status, detail, change_time)
                     VALUES (?1, 1, ?2, ?3, ?4)",
                    params![
                        command.id.to_string(),
                        CommandStatus::Queued as i64,
                        command.status_detail,
                        to_unix_micros(command.create_time)
                    ],
                )
                .map_err(sql_error("insert queued receipt"))?;
            transaction.commit().map_err(sql_error("commit command insert"))?;
            Ok(CommandInserted::Created(command))
        })
        .await
    }

    async fn get_command(&self, id: Uuid) -> Result<StoredCommand> {
        self.run(move |connection| load_command(connection, id)?.ok_or_else(|| Error::not_found("command", id))).await
    }

    async fn list_commands(
        &self,
        filter: &CommandFilter,
        after: Option<(SystemTime, Uuid)>,
        limit: usize,
    ) -> Result<Vec<StoredCommand>> {
        let filter = filter.clone();
        self.run(move |connection| {
            let mut condition = String::from("1 = 1");
            let mut values: Vec<Value> = Vec::new();
            if let Some(farm_id) = filter.farm_id {
                values.push(Value::Text(farm_id.to_string()));
                condition.push_str(&format!(" AND farm_id = ?{}", values.len()));
            }
            if let Some(device_id) = filter.device_id {
                values.push(Value::Text(device_id.to_string()));
                condition.push_str(&format!(" AND device_id = ?{}", values.len()));
            }
            if let Some(status) = filter.status {
                values.push(Value::Integer(status as i64));
                condition.push_str(&format!(" AND status = ?{}", values.len()));
            }
            if let Some((create_time, id)) = after {
                values.push(Value::Integer(to_unix_micros(create_time)));
                values.push(Value::Text(id.to_string()));
                condition.push_str(&format!(" AND (create_time, id) < (?{}, ?{})", values.len() - 1, values.len()));
            }
            values.push(Value::Integer(sql_count(limit)));
            let order = format!("create_time DESC, id DESC LIMIT ?{}", values.len());
            select_commands(connection, &condition, &order, values)
        })
        .await
    }

    async fn update_command_status(
        &self,
        id: Uuid,
        status: CommandStatus,
        detail: &str,
        at: SystemTime,
    ) -> Result<Option<StoredCommand>> {
        let detail = detail.to_string();
        self.run(move |connection| {
            let transaction = connection.transaction().map_err(sql_error("begin command status update"))?;
            let current: Option<CommandStatus> = transaction
                .query_row("SELECT status FROM commands WHERE id = ?1", [id.to_string()], |row| {
                    number_column(row, 0, CommandStatus::from_number)
                })
                .optional()
                .map_err(sql_error("read command status"))?;
            let current = current.ok_or_else(|| Error::not_found("command", id))?;
            if !current.may_become(status) {
                return Ok(None);
            }
            change_status(&transaction, id, status, &detail, at)?;
            let command = load_command(&transaction, id)?.expect("the command was found");
            transaction.commit().map_err(sql_error("commit command status update"))?;
            Ok(Some(command))
        })
        .await
    }

    async fn pending_commands(&self, farm_id: Uuid, now: SystemTime) -> Result<Vec<StoredCommand>> {
        self.run(move |connection| {
            select_commands(
                connection,
                "farm_id = ?1 AND ((status = ?2 AND expire_time > ?4) OR status IN (?3, ?5))",
                "create_time, id",
                vec![
                    Value::Text(farm_id.to_string()),
                    Value::Integer(CommandStatus::Queued as i64),
                    Value::Integer(CommandStatus::Sent as i64),
                    Value::Integer(to_unix_micros(now)),
                    Value::Integer(CommandStatus::Delivered as i64),
                ],
            )
        })
        .await
    }

    async fn expire_commands(&self, now: SystemTime, unconfirmed_before: SystemTime) -> Result<Vec<StoredCommand>> {
        self.run(move |connection| {
            let transaction = connection.transaction().map_err(sql_error("begin command expiry"))?;
            let ids: Vec<String> = {
                let mut statement = transaction
                    .prepare_cached(
                        "SELECT id FROM commands
                         WHERE (status = ?1 AND expire_time <= ?4) OR (status IN (?2, ?3) AND expire_time <= ?5)
                         ORDER BY create_time, id",
                    )
                    .map_err(sql_error("prepare command expiry"))?;
                let rows = statement
                    .query_map(
                        params![
                            CommandStatus::Queued as i64,
                            CommandStatus::Sent as i64,
                            CommandStatus::Delivered as i64,
                            to_unix_micros(now),
                            to_unix_micros(unconfirmed_before)
                        ],
                        |row| row.get(0),
                    )
                    .map_err(sql_error("find expired commands"))?;
                rows.collect::<rusqlite::Result<Vec<_>>>().map_err(sql_error("read expired command id"))?
            };
            let mut expired = Vec::with_capacity(ids.len());
            for id in ids {
                let id = Uuid::try_parse(&id).map_err(|error| Error::internal("commands.id is not a uuid", error))?;
                change_status(&transaction, id, CommandStatus::Expired, EXPIRED_DETAIL, now)?;
                expired.push(load_command(&transaction, id)?.expect("the command was found"));
            }
            transaction.commit().map_err(sql_error("commit command expiry"))?;
            Ok(expired)
        })
        .await
    }

    async fn delete_finished_commands(&self, created_before: SystemTime, limit: usize) -> Result<u64> {
        self.run(move |connection| {
            let transaction = connection.transaction().map_err(sql_error("begin command retention"))?;
            // Written out so that the planner can use the index of finished commands.
            let picked = format!(
                "SELECT id FROM commands WHERE status IN ({FINISHED}) AND create_time < ?1 ORDER BY create_time, id LIMIT ?2"
            );
            let cutoff = to_unix_micros(created_before);
            let limit = limit as i64;
            transaction
                .execute(
                    &format!("DELETE FROM command_receipts WHERE command_id IN ({picked})"),
                    params![cutoff, limit],
                )
                .map_err(sql_error("delete the history of old commands"))?;
            let deleted = transaction
                .execute(&format!("DELETE FROM commands WHERE id IN ({picked})"), params![cutoff, limit])
                .map_err(sql_error("delete old commands"))?;
            transaction.commit().map_err(sql_error("commit command retention"))?;
            Ok(deleted as u64)
        })
        .await
    }
}

//! smartfarm-command will own live commands to devices: storage with TTLs, routing to the replica that holds the
//! farm's edge link, at-most-once execution and receipts. Until the alerts and commands capability is built, every
//! RPC answers `UNIMPLEMENTED` and names that capability; nothing is faked.

#![forbid(unsafe_code)]

use tonic::{Request, Response, Status};

use smartfarm_core::Error;
use smartfarm_proto::command::v1 as pb;
use smartfarm_proto::command::v1::command_service_server::{CommandService, CommandServiceServer};

/// How the README and the issue tracker name the capability these RPCs belong to.
const CAPABILITY: &str = "the alerts and commands capability (live commands with receipts)";

/// The `CommandService` implementation.
#[derive(Clone, Debug, Default)]
pub struct CommandApi;

impl CommandApi {
    /// The tonic server for this service.
    pub fn into_server(self) -> CommandServiceServer<CommandApi> {
        CommandServiceServer::new(self)
    }
}

#[tonic::async_trait]
impl CommandService for CommandApi {
    type WatchCommandStream = tokio_stream::Empty<Result<pb::WatchCommandResponse, Status>>;

    async fn send_command(
        &self,
        _request: Request<pb::SendCommandRequest>,
    ) -> Result<Response<pb::SendCommandResponse>, Status> {
        Err(Error::unimplemented("CommandService.SendCommand", CAPABILITY).into())
    }

    async fn get_command(
        &self,
        _request: Request<pb::GetCommandRequest>,
    ) -> Result<Response<pb::GetCommandResponse>, Status> {
        Err(Error::unimplemented("CommandService.GetCommand", CAPABILITY).into())
    }

    async fn list_commands(
        &self,
        _request: Request<pb::ListCommandsRequest>,
    ) -> Result<Response<pb::ListCommandsResponse>, Status> {
        Err(Error::unimplemented("CommandService.ListCommands", CAPABILITY).into())
    }

    async fn watch_command(
        &self,
        _request: Request<pb::WatchCommandRequest>,
    ) -> Result<Response<Self::WatchCommandStream>, Status> {
        Err(Error::unimplemented("CommandService.WatchCommand", CAPABILITY).into())
    }
}

//! The one error type of smartfarm and its mapping to gRPC codes and HTTP statuses.
//!
//! Services, storage and handlers all return [`Error`]. Clients see a short lowercase message; internal errors
//! (database, I/O, bugs) are logged with their whole chain where they are turned into a response and reach the
//! client only as "internal error", so database text never leaks.

use std::fmt;

/// Everything that can go wrong in a request, by what the caller can do about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request itself is wrong; `field` names the offending field as the contract spells it.
    #[error("{field}: {reason}")]
    InvalidArgument { field: String, reason: String },
    /// The named resource does not exist (or was never visible to the caller).
    #[error("{resource} {id} not found")]
    NotFound { resource: &'static str, id: String },
    /// Creating something that must be unique and already exists.
    #[error("{0}")]
    AlreadyExists(String),
    /// The resource is in a state that does not allow the operation (for example a decommissioned device).
    #[error("{0}")]
    FailedPrecondition(String),
    /// No valid credential came with the request.
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller is known but may not touch this resource.
    #[error("{0}")]
    PermissionDenied(String),
    /// A bound was reached (in-flight batches, spool size, request size); the caller should slow down or shrink.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The RPC exists in the contract but its capability is not built yet.
    #[error("{method} is not implemented yet: it arrives with {capability}")]
    Unimplemented { method: &'static str, capability: &'static str },
    /// A dependency (database, bus, blob store) cannot be reached right now; retrying later may work.
    #[error("{0}")]
    Unavailable(String),
    /// A bug or an unexpected failure of a dependency. Only `context` is shown to operators in the short form; the
    /// source chain is logged.
    #[error("internal error: {context}")]
    Internal {
        context: String,
        #[source]
        source: Option<anyhow::Error>,
    },
}

/// Shorthand for results whose error is [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A request field is invalid.
    pub fn invalid(field: impl Into<String>, reason: impl fmt::Display) -> Self {
        Error::InvalidArgument { field: field.into(), reason: reason.to_string() }
    }

    /// A resource is missing.
    pub fn not_found(resource: &'static str, id: impl fmt::Display) -> Self {
        Error::NotFound { resource, id: id.to_string() }
    }

    /// An unexpected failure, with what was being done and why it failed.
    pub fn internal(context: impl Into<String>, source: impl Into<anyhow::Error>) -> Self {
        Error::Internal { context: context.into(), source: Some(source.into()) }
    }

    /// The RPC's capability is not built yet. `capability` names it the way the README does.
    pub fn unimplemented(method: &'static str, capability: &'static str) -> Self {
        Error::Unimplemented { method, capability }
    }

    /// The gRPC status code for this error.
    pub fn grpc_code(&self) -> tonic::Code {
        match self {
            Error::InvalidArgument { .. } => tonic::Code::InvalidArgument,
            Error::NotFound { .. } => tonic::Code::NotFound,
            Error::AlreadyExists(_) => tonic::Code::AlreadyExists,
            Error::FailedPrecondition(_) => tonic::Code::FailedPrecondition,
            Error::Unauthenticated(_) => tonic::Code::Unauthenticated,
            Error::PermissionDenied(_) => tonic::Code::PermissionDenied,
            Error::ResourceExhausted(_) => tonic::Code::ResourceExhausted,
            Error::Unimplemented { .. } => tonic::Code::Unimplemented,
            Error::Unavailable(_) => tonic::Code::Unavailable,
            Error::Internal { .. } => tonic::Code::Internal,
        }
    }

    /// The HTTP status for this error (REST and plain HTTP routes).
    pub fn http_status(&self) -> http::StatusCode {
        use http::StatusCode;
        match self {
            Error::InvalidArgument { .. } => StatusCode::BAD_REQUEST,
            Error::NotFound { .. } => StatusCode::NOT_FOUND,
            Error::AlreadyExists(_) => StatusCode::CONFLICT,
            Error::FailedPrecondition(_) => StatusCode::PRECONDITION_FAILED,
            Error::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            Error::PermissionDenied(_) => StatusCode::FORBIDDEN,
            Error::ResourceExhausted(_) => StatusCode::TOO_MANY_REQUESTS,
            Error::Unimplemented { .. } => StatusCode::NOT_IMPLEMENTED,
            Error::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::Internal { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The message a client may see. Internal errors are reduced to "internal error"; everything else is the
    /// error's own short message.
    pub fn client_message(&self) -> String {
        match self {
            Error::Internal { .. } => "internal error".to_string(),
            // The detail names hosts and databases; it is for the operator's log, not for callers.
            Error::Unavailable(_) => "service unavailable, retry later".to_string(),
            other => other.to_string(),
        }
    }

    /// Logs the error (internal and unavailable ones with their whole chain) the one time it leaves the process.
    fn log(&self) {
        match self {
            Error::Internal { source: Some(source), .. } => {
                tracing::error!(error = %self, cause = format!("{source:#}"), "request failed")
            }
            Error::Internal { source: None, .. } | Error::Unavailable(_) => {
                tracing::error!(error = %self, "request failed")
            }
            _ => tracing::debug!(error = %self, "request rejected"),
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(error: Error) -> Self {
        error.log();
        tonic::Status::new(error.grpc_code(), error.client_message())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_errors_hide_their_cause_from_clients() {
        let error = Error::internal("insert device", anyhow::anyhow!("duplicate key value violates \"devices_pkey\""));
        let status = tonic::Status::from(error);
        assert_eq!(status.code(), tonic::Code::Internal);
        assert_eq!(status.message(), "internal error");
    }

    #[test]
    fn unavailable_errors_hide_which_dependency_is_down() {
        let status = tonic::Status::from(Error::Unavailable("the database at postgres://u@db:5432/x is down".into()));
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert_eq!(status.message(), "service unavailable, retry later");
    }

    #[test]
    fn invalid_argument_names_the_field() {
        let status = tonic::Status::from(Error::invalid("farm_id", "must be a UUID"));
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(status.message(), "farm_id: must be a UUID");
    }

    #[test]
    fn every_kind_maps_to_matching_grpc_and_http_codes() {
        let cases = [
            (Error::not_found("farm", "x"), tonic::Code::NotFound, 404),
            (Error::AlreadyExists("x".into()), tonic::Code::AlreadyExists, 409),
            (Error::FailedPrecondition("x".into()), tonic::Code::FailedPrecondition, 412),
            (Error::Unauthenticated("x".into()), tonic::Code::Unauthenticated, 401),
            (Error::PermissionDenied("x".into()), tonic::Code::PermissionDenied, 403),
            (Error::ResourceExhausted("x".into()), tonic::Code::ResourceExhausted, 429),
            (Error::unimplemented("ImageService.Upload", "images"), tonic::Code::Unimplemented, 501),
            (Error::Unavailable("x".into()), tonic::Code::Unavailable, 503),
        ];
        for (error, code, http) in cases {
            assert_eq!(error.grpc_code(), code, "{error}");
            assert_eq!(error.http_status().as_u16(), http, "{error}");
        }
    }
}

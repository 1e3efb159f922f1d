//! Per-RPC request counts and latencies, named as go-grpc-prometheus names them so existing dashboards work:
//! `grpc_server_handled_total{grpc_service, grpc_method, grpc_code}` and
//! `grpc_server_handling_seconds{grpc_service, grpc_method}`.
//!
//! A gRPC call's status usually travels in the trailers at the end of the response body, so the response body is
//! wrapped and the call is recorded when the trailers pass (or when the body is dropped early: `Cancelled`).

use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use axum::body::Body;
use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use bytes::Bytes;
use http_body::Frame;

/// The services whose names may appear as label values; anything else is labelled "unknown" so that arbitrary
/// request paths cannot grow the metric's cardinality.
pub fn known_service(name: &str) -> bool {
    smartfarm_proto::SERVICE_NAMES.contains(&name) || crate::INFRASTRUCTURE_SERVICES.contains(&name)
}

/// The RPCs of the health and reflection services (not in smartfarm's contracts).
const INFRASTRUCTURE_METHODS: &[&str] = &["Check", "Watch", "List", "ServerReflectionInfo"];

/// Whether `method` is an RPC of the known `service`: only those name a label value, so calls to made-up methods
/// (which need no credentials on the health and reflection services) cannot grow the metrics either.
fn known_method(service: &str, method: &str) -> bool {
    smartfarm_proto::has_method(service, method)
        || crate::INFRASTRUCTURE_SERVICES.contains(&service) && INFRASTRUCTURE_METHODS.contains(&method)
}

/// The axum middleware.
pub async fn record_rpc(request: Request, next: Next) -> Response {
    let (service, method) = split_path(request.uri().path());
    let call = Call { service, method, start: Instant::now(), recorded: false };
    let response = next.run(request).await;
    // A trailers-only response (every error tonic returns before streaming) carries the status in its headers.
    if let Some(code) = response.headers().get("grpc-status").and_then(|value| value.to_str().ok()) {
        let code = code.to_string();
        let mut call = call;
        call.record(&code);
        return response;
    }
    response.map(|body| Body::new(ObservedBody { inner: body, call }))
}

fn split_path(path: &str) -> (String, String) {
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let service = parts.next().unwrap_or_default();
    let method = parts.next().unwrap_or_default();
    match (known_service(service), known_method(service, method)) {
        (true, true) => (service.to_string(), method.to_string()),
        (true, false) => (service.to_string(), "unknown".to_string()),
        _ => ("unknown".to_string(), "unknown".to_string()),
    }
}

/// One call in flight; records itself exactly once.
struct Call {
    service: String,
    method: String,
    start: Instant,
    recorded: bool,
}

impl Call {
    fn record(&mut self, grpc_status: &str) {
        if self.recorded {
            return;
        }
        self.recorded = true;
        let code = code_name(grpc_status);
        metrics::counter!("grpc_server_handled_total",
            "grpc_service" => self.service.clone(), "grpc_method" => self.method.clone(), "grpc_code" => code)
        .increment(1);
        metrics::histogram!("grpc_server_handling_seconds",
            "grpc_service" => self.service.clone(), "grpc_method" => self.method.clone())
        .record(self.start.elapsed().as_secs_f64());
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        // The body was dropped before its trailers: the client went away or the stream was cut.
        self.record("1");
    }
}

fn code_name(grpc_status: &str) -> &'static str {
    let number: i32 = grpc_status.trim().parse().unwrap_or(2);
    match tonic::Code::from_i32(number) {
        tonic::Code::Ok => "OK",
        tonic::Code::Cancelled => "Canceled",
        tonic::Code::Unknown => "Unknown",
        tonic::Code::InvalidArgument => "InvalidArgument",
        tonic::Code::DeadlineExceeded => "DeadlineExceeded",
        tonic::Code::NotFound => "NotFound",
        tonic::Code::AlreadyExists => "AlreadyExists",
        tonic::Code::PermissionDenied => "PermissionDenied",
        tonic::Code::ResourceExhausted => "ResourceExhausted",
        tonic::Code::FailedPrecondition => "FailedPrecondition",
        tonic::Code::Aborted => "Aborted",
        tonic::Code::OutOfRange => "OutOfRange",
        tonic::Code::Unimplemented => "Unimplemented",
        tonic::Code::Internal => "Internal",
        tonic::Code::Unavailable => "Unavailable",
        tonic::Code::DataLoss => "DataLoss",
        tonic::Code::Unauthenticated => "Unauthenticated",
    }
}

/// A response body that records its call when the trailers pass.
struct ObservedBody {
    inner: Body,
    call: Call,
}

impl http_body::Body for ObservedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match &frame {
            Some(Ok(frame)) => {
                if let Some(trailers) = frame.trailers_ref() {
                    let status = trailers.get("grpc-status").and_then(|v| v.to_str().ok()).unwrap_or("2").to_string();
                    self.call.record(&status);
                }
            }
            Some(Err(_)) => self.call.record("13"),
            // A body that ends without trailers was not a gRPC response; count it as unknown.
            None => self.call.record("2"),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_split_and_unknown_services_folded() {
        assert_eq!(
            split_path("/smartfarm.device.v1.DeviceService/GetDevice"),
            ("smartfarm.device.v1.DeviceService".to_string(), "GetDevice".to_string())
        );
        assert_eq!(split_path("/evil.Service/x"), ("unknown".to_string(), "unknown".to_string()));
        assert_eq!(split_path("/metrics"), ("unknown".to_string(), "unknown".to_string()));
        assert_eq!(
            split_path("/grpc.health.v1.Health/Check"),
            ("grpc.health.v1.Health".to_string(), "Check".to_string())
        );
        // Made-up methods, on services that need no credentials too: one label value for all of them.
        for made_up in
            ["/grpc.health.v1.Health/x1", "/smartfarm.device.v1.DeviceService/Nope", "/grpc.health.v1.Health/"]
        {
            assert_eq!(split_path(made_up).1, "unknown", "{made_up}");
        }
    }

    #[test]
    fn codes_have_go_grpc_prometheus_names() {
        assert_eq!(code_name("0"), "OK");
        assert_eq!(code_name("16"), "Unauthenticated");
        assert_eq!(code_name("garbage"), "Unknown");
    }
}

//! smartfarm-gateway owns the HTTP front of a smartfarm process: the one listener (plaintext or TLS) on which gRPC,
//! gRPC-web, `grpc.health.v1`, server reflection (v1 and v1alpha) and `/metrics` are served; authentication of
//! every RPC; and per-RPC metrics. It wires services that others implement and holds no business logic. REST
//! (OpenAPI) and the web UI's static files will be served here too.

#![forbid(unsafe_code)]

pub mod auth;
pub mod metrics;
pub mod server;
pub mod tls;

use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use tonic::service::Routes;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use smartfarm_core::Result;

pub use auth::Authenticator;

/// The services every listener serves besides the smartfarm services that run: health and reflection. They need no
/// credentials (load balancers and grpcurl must reach them).
pub(crate) const INFRASTRUCTURE_SERVICES: &[&str] =
    &["grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"];

/// What the gateway serves: the running smartfarm services' tonic routes and their fully qualified names.
#[derive(Default)]
pub struct Services {
    routes: Routes,
    names: Vec<&'static str>,
    /// Plain HTTP routes that carry their own authorization (signed URLs), served beside gRPC.
    http: axum::Router,
}

impl Services {
    /// Adds a tonic service.
    pub fn with_service<S>(mut self, service: S) -> Self
    where
        S: tower::Service<http::Request<tonic::body::Body>, Error = std::convert::Infallible>
            + tonic::server::NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Response: axum::response::IntoResponse,
        S::Future: Send + 'static,
    {
        self.names.push(S::NAME);
        self.routes = self.routes.add_service(service);
        self
    }

    /// Adds plain HTTP routes. They are served without the gateway's authentication: each must authorize its
    /// requests itself (as signed URLs do).
    pub fn with_http_routes(mut self, routes: axum::Router) -> Self {
        self.http = self.http.merge(routes);
        self
    }

    /// The names of the services added so far.
    pub fn names(&self) -> &[&'static str] {
        &self.names
    }
}

/// Builds the whole HTTP application: the smartfarm services behind authentication, health and reflection open to
/// all, gRPC-web translation in front, per-RPC metrics around it all, and `/metrics` and `/healthz` beside.
/// Returns the router and the health reporter (marked serving), so the caller can mark it not-serving on shutdown.
pub async fn app(
    services: Services,
    authenticator: Authenticator,
    metrics: PrometheusHandle,
) -> Result<(axum::Router, HealthReporter)> {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    for name in services.names() {
        health_reporter.set_service_status(name, ServingStatus::Serving).await;
    }

    // The same advertised names for both reflection versions: v1 for `buf curl` and newer clients, v1alpha for
    // grpcurl 1.8 and older tools.
    let reflection_builder = || {
        let mut builder = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(smartfarm_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
        for name in services.names().iter().chain(INFRASTRUCTURE_SERVICES) {
            builder = builder.with_service_name(*name);
        }
        builder
    };
    let reflection_v1 = reflection_builder()
        .build_v1()
        .map_err(|error| smartfarm_core::Error::internal("build reflection v1", error))?;
    let reflection_v1alpha = reflection_builder()
        .build_v1alpha()
        .map_err(|error| smartfarm_core::Error::internal("build reflection v1alpha", error))?;

    let grpc = services
        .routes
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .into_axum_router()
        // Innermost: every smartfarm RPC needs a principal; health and reflection are let through by path.
        .layer(axum::middleware::from_fn_with_state(authenticator, auth::require_principal))
        // Around authentication, so rejected calls are counted too (as Unauthenticated).
        .layer(axum::middleware::from_fn(metrics::record_rpc))
        // Outermost on the gRPC routes only: it turns gRPC-web (HTTP/1.1, browsers) into gRPC for everything
        // inside. Applied to the whole app it would answer 400 to plain HTTP requests such as /metrics.
        .layer(tonic_web::GrpcWebLayer::new());

    let plain = axum::Router::new()
        .route("/metrics", get(move || std::future::ready(metrics.render())))
        .route("/healthz", get(|| std::future::ready("ok\n")))
        .merge(services.http);
    Ok((plain.merge(grpc), health_reporter))
}

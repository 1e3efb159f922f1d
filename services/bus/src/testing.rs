//! For tests that need a NATS server with JetStream (127.0.0.1:4222 where the project is tested;
//! `SMARTFARM_TEST_NATS_URL` points elsewhere).

/// The test NATS server's URL (`nats://HOST:PORT`); fails, saying how to start NATS, when none answers.
pub fn nats_server() -> String {
    let server = std::env::var("SMARTFARM_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let address = server.trim_start_matches("nats://");
    assert!(
        std::net::TcpStream::connect(address).is_ok(),
        "no NATS server answers at {server}: this test needs NATS with JetStream (Debian package nats-server), \
         e.g. `nats-server -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server`, or SMARTFARM_TEST_NATS_URL"
    );
    server
}

/// A bus URL on the test NATS server with streams of its own (`<prefix>-<a new id>`), so tests sharing the server
/// do not hear each other; delete them at the end with [`crate::Bus::remove_streams`].
pub fn bus_url(prefix: &str) -> String {
    format!("{}/{prefix}-{}", nats_server(), uuid::Uuid::now_v7().simple())
}

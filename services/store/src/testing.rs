//! Helpers for tests that need a real PostgreSQL: each test gets a database of its own, created from
//! `SMARTFARM_TEST_DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`) and dropped afterwards.
//! A missing server fails the test with the command that starts one; it never skips.

use tokio_postgres::NoTls;

/// The server tests use unless `SMARTFARM_TEST_DATABASE_URL` says otherwise.
pub const DEFAULT_TEST_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// A throwaway database on the test PostgreSQL server, dropped when this value is dropped.
#[derive(Debug)]
pub struct TestPostgres {
    /// The URL of the new database.
    pub url: String,
    admin_url: String,
    name: String,
}

impl TestPostgres {
    /// Creates a fresh, empty database. Panics with instructions when the server cannot be reached.
    pub async fn create() -> TestPostgres {
        let admin_url =
            std::env::var("SMARTFARM_TEST_DATABASE_URL").unwrap_or_else(|_| DEFAULT_TEST_DATABASE_URL.to_string());
        let name = format!("smartfarm_test_{}", uuid::Uuid::now_v7().simple());
        let (client, connection) = tokio_postgres::connect(&admin_url, NoTls).await.unwrap_or_else(|error| {
            panic!(
                "PostgreSQL is needed for this test and is not reachable at {admin_url}: {error}. Start it (Debian: \
                 `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`) or point \
                 SMARTFARM_TEST_DATABASE_URL at a server where this user may create databases."
            )
        });
        let connection = tokio::spawn(connection);
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap_or_else(|error| panic!("cannot create test database {name} on {admin_url}: {error}"));
        drop(client);
        let _ = connection.await;
        let url = with_database(&admin_url, &name);
        TestPostgres { url, admin_url, name }
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        // Drop runs outside async context, possibly inside a runtime: do the async cleanup on a thread of its own.
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
            runtime.block_on(async {
                let (client, connection) = tokio_postgres::connect(&admin_url, NoTls).await.ok()?;
                let connection = tokio::spawn(connection);
                let _ = client.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await;
                drop(client);
                let _ = connection.await;
                Some(())
            })
        });
        let _ = cleanup.join();
    }
}

/// `url` with its database name replaced by `database`.
fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (url, String::new()),
    };
    let authority_start = base.find("://").map(|i| i + 3).unwrap_or(0);
    let path_start = base[authority_start..].find('/').map(|i| i + authority_start).unwrap_or(base.len());
    format!("{}/{database}{query}", &base[..path_start])
}

#[cfg(test)]
mod tests {
    #[test]
    fn database_names_are_replaced() {
        assert_eq!(super::with_database("postgres://u@h:5432/postgres", "t1"), "postgres://u@h:5432/t1");
        assert_eq!(super::with_database("postgres://u@h", "t1"), "postgres://u@h/t1");
        assert_eq!(
            super::with_database("postgres://u@h/db?sslmode=disable", "t1"),
            "postgres://u@h/t1?sslmode=disable"
        );
    }
}

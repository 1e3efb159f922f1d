//! The Protobuf contracts of smartfarm compiled for Rust: the messages, the tonic clients and servers of the six
//! capabilities' seven services, serde impls that read and write canonical proto JSON, and the file descriptor set that server
//! reflection serves. This crate owns no behaviour; it must never depend on another smartfarm crate.

#![forbid(unsafe_code)]
// Generated code: its doc comments come from the .proto files, its shape from prost.
#![allow(clippy::all, missing_docs)]

/// The encoded `FileDescriptorSet` of every smartfarm contract, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/smartfarm_descriptor.bin"));

/// Re-exported so that users of the contracts name one `Timestamp`, `Duration`, `FieldMask`, … everywhere.
pub use pbjson_types;

macro_rules! contract {
    ($package:literal) => {
        tonic::include_proto!($package);
        include!(concat!(env!("OUT_DIR"), "/", $package, ".serde.rs"));
    };
}

pub mod common {
    pub mod v1 {
        contract!("smartfarm.common.v1");
    }
}
pub mod device {
    pub mod v1 {
        contract!("smartfarm.device.v1");
    }
}
pub mod ingestion {
    pub mod v1 {
        contract!("smartfarm.ingestion.v1");
    }
}
pub mod image {
    pub mod v1 {
        contract!("smartfarm.image.v1");
    }
}
pub mod inference {
    pub mod v1 {
        contract!("smartfarm.inference.v1");
    }
}
pub mod alert {
    pub mod v1 {
        contract!("smartfarm.alert.v1");
    }
}
pub mod command {
    pub mod v1 {
        contract!("smartfarm.command.v1");
    }
}

/// The fully qualified names of the smartfarm services (the ingestion capability has two), as reflection and health
/// checks name them.
pub const SERVICE_NAMES: &[&str] = &[
    "smartfarm.device.v1.DeviceService",
    "smartfarm.ingestion.v1.IngestionService",
    "smartfarm.ingestion.v1.TelemetryService",
    "smartfarm.image.v1.ImageService",
    "smartfarm.inference.v1.InferenceService",
    "smartfarm.alert.v1.AlertService",
    "smartfarm.command.v1.CommandService",
];

/// Whether the contracts give `service` (fully qualified) an RPC named `method`.
pub fn has_method(service: &str, method: &str) -> bool {
    static METHODS: std::sync::LazyLock<std::collections::HashSet<String>> = std::sync::LazyLock::new(|| {
        let set = <pbjson_types::FileDescriptorSet as prost::Message>::decode(FILE_DESCRIPTOR_SET)
            .expect("the descriptor set built into this crate decodes");
        let mut methods = std::collections::HashSet::new();
        for file in &set.file {
            for service in &file.service {
                for method in &service.method {
                    methods.insert(format!("{}.{}/{}", file.package(), service.name(), method.name()));
                }
            }
        }
        methods
    });
    METHODS.contains(&format!("{service}/{method}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_set_holds_every_service() {
        let set = <pbjson_types::FileDescriptorSet as prost::Message>::decode(FILE_DESCRIPTOR_SET).unwrap();
        let mut names = Vec::new();
        for file in &set.file {
            for service in &file.service {
                names.push(format!("{}.{}", file.package(), service.name()));
            }
        }
        for expected in SERVICE_NAMES {
            assert!(names.iter().any(|n| n == expected), "{expected} missing from the descriptor set: {names:?}");
        }
    }

    #[test]
    fn messages_round_trip_through_canonical_json() {
        let request = device::v1::RegisterDeviceRequest {
            farm_id: "0193a4b2-0000-7000-8000-000000000000".into(),
            name: "north greenhouse probe".into(),
            kind: device::v1::DeviceKind::Sensor as i32,
            labels: [("row".to_string(), "7".to_string())].into(),
        };
        let json = serde_json::to_value(&request).unwrap();
        assert_eq!(json["kind"], "DEVICE_KIND_SENSOR");
        assert_eq!(json["farmId"], "0193a4b2-0000-7000-8000-000000000000");
        let back: device::v1::RegisterDeviceRequest = serde_json::from_value(json).unwrap();
        assert_eq!(back, request);
    }
}

//! MQTT 3.1.1 and 5 on the wire, through rumqttc's packet codecs, behind one small vocabulary of the packets a
//! broker receives and sends. The protocol level comes from the CONNECT packet and holds for the connection.

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;

/// The largest packet a sensor may send.
pub const MAX_PACKET_BYTES: usize = 256 * 1024;

/// The protocol a connection speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    V311,
    V5,
}

/// Delivery guarantee of a publish.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub enum Qos {
    AtMostOnce = 0,
    AtLeastOnce = 1,
    ExactlyOnce = 2,
}

/// What a client sends.
#[derive(Clone, Debug, PartialEq)]
pub enum Inbound {
    /// `clean_session` is MQTT 5's clean start: false asks the broker to resume the client's session.
    Connect {
        client_id: String,
        keep_alive_secs: u16,
        clean_session: bool,
        login: Option<(String, String)>,
    },
    Publish {
        topic: String,
        qos: Qos,
        pkid: u16,
        payload: Bytes,
    },
    PubAck,
    PubRec {
        pkid: u16,
    },
    PubRel {
        pkid: u16,
    },
    PubComp,
    Subscribe {
        pkid: u16,
        filters: Vec<(String, Qos)>,
    },
    Unsubscribe {
        pkid: u16,
        filters: Vec<String>,
    },
    PingReq,
    Disconnect,
}

/// Why a CONNECT is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectRefusal {
    BadCredentials,
    NotAuthorized,
    /// A protocol level other than 4 (3.1.1) or 5.
    UnsupportedProtocol,
}

/// The outcome of one publish, as told in its acknowledgement (MQTT 5 carries it; 3.1.1 can only acknowledge).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PublishOutcome {
    Accepted,
    NotAuthorized,
    PayloadInvalid,
}

/// What the broker sends.
#[derive(Clone, Debug, PartialEq)]
pub enum Outbound {
    /// `Ok(session_present)` or the refusal.
    ConnAck(Result<bool, ConnectRefusal>),
    PubAck {
        pkid: u16,
        outcome: PublishOutcome,
    },
    PubRec {
        pkid: u16,
        outcome: PublishOutcome,
    },
    PubRel {
        pkid: u16,
    },
    PubComp {
        pkid: u16,
    },
    /// `None` for a refused filter.
    SubAck {
        pkid: u16,
        granted: Vec<Option<Qos>>,
    },
    UnsubAck {
        pkid: u16,
        count: usize,
    },
    PingResp,
    Publish {
        topic: String,
        qos: Qos,
        pkid: u16,
        payload: Bytes,
    },
}

/// A packet that cannot be read; the connection is closed.
#[derive(Debug, thiserror::Error)]
#[error("malformed MQTT packet: {0}")]
pub struct Malformed(pub String);

fn qos_from_v4(qos: rumqttc::mqttbytes::QoS) -> Qos {
    match qos {
        rumqttc::mqttbytes::QoS::AtMostOnce => Qos::AtMostOnce,
        rumqttc::mqttbytes::QoS::AtLeastOnce => Qos::AtLeastOnce,
        rumqttc::mqttbytes::QoS::ExactlyOnce => Qos::ExactlyOnce,
    }
}

fn qos_to_v4(qos: Qos) -> rumqttc::mqttbytes::QoS {
    match qos {
        Qos::AtMostOnce => rumqttc::mqttbytes::QoS::AtMostOnce,
        Qos::AtLeastOnce => rumqttc::mqttbytes::QoS::AtLeastOnce,
        Qos::ExactlyOnce => rumqttc::mqttbytes::QoS::ExactlyOnce,
    }
}

fn qos_from_v5(qos: rumqttc::v5::mqttbytes::QoS) -> Qos {
    match qos {
        rumqttc::v5::mqttbytes::QoS::AtMostOnce => Qos::AtMostOnce,
        rumqttc::v5::mqttbytes::QoS::AtLeastOnce => Qos::AtLeastOnce,
        rumqttc::v5::mqttbytes::QoS::ExactlyOnce => Qos::ExactlyOnce,
    }
}

fn qos_to_v5(qos: Qos) -> rumqttc::v5::mqttbytes::QoS {
    match qos {
        Qos::AtMostOnce => rumqttc::v5::mqttbytes::QoS::AtMostOnce,
        Qos::AtLeastOnce => rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        Qos::ExactlyOnce => rumqttc::v5::mqttbytes::QoS::ExactlyOnce,
    }
}

/// The protocol level byte of a CONNECT at the start of `buffer`: `Ok(None)` when more bytes are needed.
fn connect_protocol_level(buffer: &[u8]) -> Result<Option<u8>, Malformed> {
    let Some(&first) = buffer.first() else { return Ok(None) };
    if first >> 4 != 1 {
        return Err(Malformed(format!("the first packet must be CONNECT, got packet type {}", first >> 4)));
    }
    // Skip the remaining-length varint (1 to 4 bytes, the last without its high bit).
    let mut position = 1;
    loop {
        let Some(&byte) = buffer.get(position) else { return Ok(None) };
        position += 1;
        if byte & 0x80 == 0 {
            break;
        }
        if position > 4 {
            return Err(Malformed("the remaining length is longer than 4 bytes".into()));
        }
    }
    let (Some(&high), Some(&low)) = (buffer.get(position), buffer.get(position + 1)) else { return Ok(None) };
    let name_length = u16::from_be_bytes([high, low]) as usize;
    Ok(buffer.get(position + 2 + name_length).copied())
}

/// Why the first packet of a connection cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    Malformed(#[from] Malformed),
    /// The client speaks a protocol level this broker does not (3.1.1 asks for CONNACK 0x01 before closing).
    #[error("unsupported MQTT protocol level {0}")]
    UnsupportedLevel(u8),
}

/// Reads the first packet of a connection, which must be CONNECT, and tells the protocol from its level byte
/// (rumqttc's 3.1.1 reader would accept level 5 and misread its properties). `Ok(None)`: more bytes are needed.
pub fn read_connect(buffer: &mut BytesMut) -> Result<Option<(Version, Inbound)>, ConnectError> {
    let Some(level) = connect_protocol_level(buffer)? else { return Ok(None) };
    match level {
        // MQTT 3.1 ("MQIsdp", level 3) is not read by rumqttc; its clients fall back to 3.1.1 on CONNACK 0x01.
        4 => match v4::Packet::read(buffer, MAX_PACKET_BYTES) {
            Ok(v4::Packet::Connect(connect)) => {
                let login = connect.login.map(|login| (login.username, login.password));
                Ok(Some((
                    Version::V311,
                    Inbound::Connect {
                        client_id: connect.client_id,
                        keep_alive_secs: connect.keep_alive,
                        clean_session: connect.clean_session,
                        login,
                    },
                )))
            }
            Ok(other) => Err(Malformed(format!("the first packet must be CONNECT, got {other:?}")).into()),
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
            Err(error) => Err(Malformed(error.to_string()).into()),
        },
        5 => match v5::Packet::read(buffer, Some(MAX_PACKET_BYTES as u32)) {
            Ok(v5::Packet::Connect(connect, _will, login)) => {
                let login = login.map(|login| (login.username, login.password));
                Ok(Some((
                    Version::V5,
                    Inbound::Connect {
                        client_id: connect.client_id,
                        keep_alive_secs: connect.keep_alive,
                        clean_session: connect.clean_start,
                        login,
                    },
                )))
            }
            Ok(other) => Err(Malformed(format!("the first packet must be CONNECT, got {other:?}")).into()),
            Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
            Err(error) => Err(Malformed(error.to_string()).into()),
        },
        other => Err(ConnectError::UnsupportedLevel(other)),
    }
}

/// Reads the next packet after CONNECT. `Ok(None)`: more bytes are needed.
///
/// "More bytes" is decided on the frame (its fixed header's length) before the packet is parsed: rumqttc takes the
/// whole frame off the buffer and then parses it, so a frame too short for what it declares inside would otherwise
/// come back as "more bytes needed", lost without a word, and the packets behind it would wait.
pub fn read(version: Version, buffer: &mut BytesMut) -> Result<Option<Inbound>, Malformed> {
    match version {
        Version::V311 => {
            match rumqttc::mqttbytes::check(buffer.iter(), MAX_PACKET_BYTES) {
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => return Ok(None),
                Err(error) => return Err(Malformed(error.to_string())),
                Ok(_) => {}
            }
            match v4::Packet::read(buffer, MAX_PACKET_BYTES) {
                Ok(packet) => from_v4(packet).map(Some),
                Err(error) => Err(Malformed(error.to_string())),
            }
        }
        // A DISCONNECT without a reason code (what most clients send) has no body, which rumqttc's reader refuses.
        Version::V5 if buffer.starts_with(&[0xE0, 0x00]) => {
            let _ = buffer.split_to(2);
            Ok(Some(Inbound::Disconnect))
        }
        Version::V5 => {
            match rumqttc::v5::mqttbytes::v5::check(buffer.iter(), Some(MAX_PACKET_BYTES as u32)) {
                Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => return Ok(None),
                Err(error) => return Err(Malformed(error.to_string())),
                Ok(_) => {}
            }
            match v5::Packet::read(buffer, Some(MAX_PACKET_BYTES as u32)) {
                Ok(packet) => from_v5(packet).map(Some),
                Err(error) => Err(Malformed(error.to_string())),
            }
        }
    }
}

fn from_v4(packet: v4::Packet) -> Result<Inbound, Malformed> {
    Ok(match packet {
        v4::Packet::Publish(publish) => Inbound::Publish {
            topic: publish.topic,
            qos: qos_from_v4(publish.qos),
            pkid: publish.pkid,
            payload: publish.payload,
        },
        v4::Packet::PubAck(_) => Inbound::PubAck,
        v4::Packet::PubRec(rec) => Inbound::PubRec { pkid: rec.pkid },
        v4::Packet::PubRel(rel) => Inbound::PubRel { pkid: rel.pkid },
        v4::Packet::PubComp(_) => Inbound::PubComp,
        v4::Packet::Subscribe(subscribe) => Inbound::Subscribe {
            pkid: subscribe.pkid,
            filters: subscribe.filters.into_iter().map(|f| (f.path, qos_from_v4(f.qos))).collect(),
        },
        v4::Packet::Unsubscribe(unsubscribe) => {
            Inbound::Unsubscribe { pkid: unsubscribe.pkid, filters: unsubscribe.topics }
        }
        v4::Packet::PingReq => Inbound::PingReq,
        v4::Packet::Disconnect => Inbound::Disconnect,
        other => return Err(Malformed(format!("a client may not send {other:?}"))),
    })
}

fn from_v5(packet: v5::Packet) -> Result<Inbound, Malformed> {
    Ok(match packet {
        v5::Packet::Publish(publish) => Inbound::Publish {
            topic: String::from_utf8(publish.topic.to_vec()).map_err(|_| Malformed("the topic is not UTF-8".into()))?,
            qos: qos_from_v5(publish.qos),
            pkid: publish.pkid,
            payload: publish.payload,
        },
        v5::Packet::PubAck(_) => Inbound::PubAck,
        v5::Packet::PubRec(rec) => Inbound::PubRec { pkid: rec.pkid },
        v5::Packet::PubRel(rel) => Inbound::PubRel { pkid: rel.pkid },
        v5::Packet::PubComp(_) => Inbound::PubComp,
        v5::Packet::Subscribe(subscribe) => Inbound::Subscribe {
            pkid: subscribe.pkid,
            filters: subscribe.filters.into_iter().map(|f| (f.path, qos_from_v5(f.qos))).collect(),
        },
        v5::Packet::Unsubscribe(unsubscribe) => {
            Inbound::Unsubscribe { pkid: unsubscribe.pkid, filters: unsubscribe.filters }
        }
        v5::Packet::PingReq(_) => Inbound::PingReq,
        v5::Packet::Disconnect(_) => Inbound::Disconnect,
        other => return Err(Malformed(format!("a client may not send {other:?}"))),
    })
}

/// Appends the encoding of `packet` to `buffer`.
pub fn write(version: Version, packet: Outbound, buffer: &mut BytesMut) -> Result<(), Malformed> {
    match version {
        Version::V311 => {
            let packet = match packet {
                Outbound::ConnAck(result) => v4::Packet::ConnAck(v4::ConnAck::new(
                    match result {
                        Ok(_) => v4::ConnectReturnCode::Success,
                        Err(ConnectRefusal::BadCredentials) => v4::ConnectReturnCode::BadUserNamePassword,
                        Err(ConnectRefusal::NotAuthorized) => v4::ConnectReturnCode::NotAuthorized,
                        Err(ConnectRefusal::UnsupportedProtocol) => v4::ConnectReturnCode::RefusedProtocolVersion,
                    },
                    result.unwrap_or(false),
                )),
                // 3.1.1 has no way to say a publish was refused: it is acknowledged and the refusal told elsewhere.
                Outbound::PubAck { pkid, .. } => v4::Packet::PubAck(v4::PubAck::new(pkid)),
                Outbound::PubRec { pkid, .. } => v4::Packet::PubRec(v4::PubRec::new(pkid)),
                Outbound::PubRel { pkid } => v4::Packet::PubRel(v4::PubRel::new(pkid)),
                Outbound::PubComp { pkid } => v4::Packet::PubComp(v4::PubComp::new(pkid)),
                Outbound::SubAck { pkid, granted } => v4::Packet::SubAck(v4::SubAck {
                    pkid,
                    return_codes: granted
                        .into_iter()
                        .map(|qos| match qos {
                            Some(qos) => v4::SubscribeReasonCode::Success(qos_to_v4(qos)),
                            None => v4::SubscribeReasonCode::Failure,
                        })
                        .collect(),
                }),
                Outbound::UnsubAck { pkid, .. } => v4::Packet::UnsubAck(v4::UnsubAck { pkid }),
                Outbound::PingResp => v4::Packet::PingResp,
                Outbound::Publish { topic, qos, pkid, payload } => {
                    let mut publish = v4::Publish::new(topic, qos_to_v4(qos), payload.to_vec());
                    publish.pkid = pkid;
                    v4::Packet::Publish(publish)
                }
            };
            packet.write(buffer, usize::MAX).map(drop).map_err(|error| Malformed(error.to_string()))
        }
        Version::V5 => {
            let reason = |outcome: PublishOutcome| match outcome {
                PublishOutcome::Accepted => v5::PubAckReason::Success,
                PublishOutcome::NotAuthorized => v5::PubAckReason::NotAuthorized,
                PublishOutcome::PayloadInvalid => v5::PubAckReason::PayloadFormatInvalid,
            };
            let packet = match packet {
                Outbound::ConnAck(result) => v5::Packet::ConnAck(v5::ConnAck {
                    session_present: result.unwrap_or(false),
                    code: match result {
                        Ok(_) => v5::ConnectReturnCode::Success,
                        Err(ConnectRefusal::BadCredentials) => v5::ConnectReturnCode::BadUserNamePassword,
                        Err(ConnectRefusal::NotAuthorized) => v5::ConnectReturnCode::NotAuthorized,
                        Err(ConnectRefusal::UnsupportedProtocol) => v5::ConnectReturnCode::UnsupportedProtocolVersion,
                    },
                    properties: None,
                }),
                Outbound::PubAck { pkid, outcome } => {
                    v5::Packet::PubAck(v5::PubAck { pkid, reason: reason(outcome), properties: None })
                }
                Outbound::PubRec { pkid, outcome } => v5::Packet::PubRec(v5::PubRec {
                    pkid,
                    reason: match outcome {
                        PublishOutcome::Accepted => v5::PubRecReason::Success,
                        PublishOutcome::NotAuthorized => v5::PubRecReason::NotAuthorized,
                        PublishOutcome::PayloadInvalid => v5::PubRecReason::PayloadFormatInvalid,
                    },
                    properties: None,
                }),
                Outbound::PubRel { pkid } => {
                    v5::Packet::PubRel(v5::PubRel { pkid, reason: v5::PubRelReason::Success, properties: None })
                }
                Outbound::PubComp { pkid } => {
                    v5::Packet::PubComp(v5::PubComp { pkid, reason: v5::PubCompReason::Success, properties: None })
                }
                Outbound::SubAck { pkid, granted } => v5::Packet::SubAck(v5::SubAck {
                    pkid,
                    return_codes: granted
                        .into_iter()
                        .map(|qos| match qos {
                            Some(qos) => v5::SubscribeReasonCode::Success(qos_to_v5(qos)),
                            None => v5::SubscribeReasonCode::NotAuthorized,
                        })
                        .collect(),
                    properties: None,
                }),
                Outbound::UnsubAck { pkid, count } => v5::Packet::UnsubAck(v5::UnsubAck {
                    pkid,
                    reasons: vec![v5::UnsubAckReason::Success; count],
                    properties: None,
                }),
                Outbound::PingResp => v5::Packet::PingResp(v5::PingResp),
                Outbound::Publish { topic, qos, pkid, payload } => {
                    let mut publish = v5::Publish::new(topic, qos_to_v5(qos), payload.to_vec(), None);
                    publish.pkid = pkid;
                    v5::Packet::Publish(publish)
                }
            };
            packet.write(buffer, None).map(drop).map_err(|error| Malformed(error.to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(text: &str) -> BytesMut {
        BytesMut::from(
            &(0..text.len()).step_by(2).map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap()).collect::<Vec<u8>>()
                [..],
        )
    }

    #[test]
    fn mosquitto_connects_are_read_in_both_versions() {
        // Captured from mosquitto_pub 2.0 (-V mqttv5 and the default 3.1.1), user "user", password "pass".
        let mut v5 = hex("101c00044d51545405c2003c032100140000000475736572000470617373");
        let (version, connect) = read_connect(&mut v5).unwrap().unwrap();
        assert_eq!(version, Version::V5);
        assert_eq!(
            connect,
            Inbound::Connect {
                client_id: String::new(),
                keep_alive_secs: 60,
                clean_session: true,
                login: Some(("user".into(), "pass".into()))
            }
        );
        assert!(v5.is_empty());

        let mut v311 = hex("101800044d51545404c2003c0000000475736572000470617373");
        let (version, connect) = read_connect(&mut v311).unwrap().unwrap();
        assert_eq!(version, Version::V311);
        assert_eq!(
            connect,
            Inbound::Connect {
                client_id: String::new(),
                keep_alive_secs: 60,
                clean_session: true,
                login: Some(("user".into(), "pass".into()))
            }
        );

        let mut level3 = hex("101a00064d514973647003c2003c0000000475736572000470617373");
        assert!(matches!(read_connect(&mut level3), Err(ConnectError::UnsupportedLevel(3))));

        let mut partial = hex("101c00044d5154");
        assert_eq!(read_connect(&mut partial).unwrap(), None, "half a packet: wait for more");
        let mut not_connect = hex("c000");
        assert!(read_connect(&mut not_connect).is_err());
    }

    /// A whole frame too short for what it declares (an MQTT 5 PUBLISH without its properties length) is malformed,
    /// not "more bytes needed": it is not lost in silence, and the packet behind it does not wait.
    #[test]
    fn a_frame_shorter_than_its_contents_is_malformed() {
        let publish_without_properties = [0x32u8, 0x07, 0x00, 0x03, b'a', b'/', b'b', 0x00, 0x01];
        let mut buffer = BytesMut::from(&publish_without_properties[..]);
        buffer.extend_from_slice(&[0xC0, 0x00]);
        assert!(read(Version::V5, &mut buffer).is_err(), "malformed");
        // A frame not all here yet is still "more bytes needed", in both versions.
        for version in [Version::V5, Version::V311] {
            let mut partial = BytesMut::from(&publish_without_properties[..5]);
            assert_eq!(read(version, &mut partial).unwrap(), None);
            assert_eq!(partial.len(), 5, "nothing taken off the buffer");
        }
    }

    #[test]
    fn a_bare_mqtt5_disconnect_is_a_goodbye() {
        let mut buffer = BytesMut::from(&[0xE0u8, 0x00, 0xC0, 0x00][..]);
        assert_eq!(read(Version::V5, &mut buffer).unwrap(), Some(Inbound::Disconnect));
        assert_eq!(read(Version::V5, &mut buffer).unwrap(), Some(Inbound::PingReq), "the next packet is intact");
    }
}

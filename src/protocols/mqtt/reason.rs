//! MQTT 5.0 reason codes, with the 3.1.1 CONNACK return-code mapping.
#![allow(missing_docs)]

pub const SUCCESS: u8 = 0x00;
pub const GRANTED_QOS_1: u8 = 0x01;
pub const GRANTED_QOS_2: u8 = 0x02;
pub const DISCONNECT_WITH_WILL: u8 = 0x04;
pub const NO_MATCHING_SUBSCRIBERS: u8 = 0x10;
pub const NO_SUBSCRIPTION_EXISTED: u8 = 0x11;
pub const UNSPECIFIED_ERROR: u8 = 0x80;
pub const MALFORMED_PACKET: u8 = 0x81;
pub const PROTOCOL_ERROR: u8 = 0x82;
pub const IMPLEMENTATION_SPECIFIC: u8 = 0x83;
pub const UNSUPPORTED_PROTOCOL_VERSION: u8 = 0x84;
pub const CLIENT_ID_NOT_VALID: u8 = 0x85;
pub const BAD_USERNAME_OR_PASSWORD: u8 = 0x86;
pub const NOT_AUTHORIZED: u8 = 0x87;
pub const SERVER_UNAVAILABLE: u8 = 0x88;
pub const SERVER_BUSY: u8 = 0x89;
pub const BANNED: u8 = 0x8A;
pub const SERVER_SHUTTING_DOWN: u8 = 0x8B;
pub const BAD_AUTHENTICATION_METHOD: u8 = 0x8C;
pub const KEEP_ALIVE_TIMEOUT: u8 = 0x8D;
pub const SESSION_TAKEN_OVER: u8 = 0x8E;
pub const TOPIC_FILTER_INVALID: u8 = 0x8F;
pub const TOPIC_NAME_INVALID: u8 = 0x90;
pub const PACKET_ID_IN_USE: u8 = 0x91;
pub const PACKET_ID_NOT_FOUND: u8 = 0x92;
pub const RECEIVE_MAXIMUM_EXCEEDED: u8 = 0x93;
pub const TOPIC_ALIAS_INVALID: u8 = 0x94;
pub const PACKET_TOO_LARGE: u8 = 0x95;
pub const MESSAGE_RATE_TOO_HIGH: u8 = 0x96;
pub const QUOTA_EXCEEDED: u8 = 0x97;
pub const ADMINISTRATIVE_ACTION: u8 = 0x98;
pub const PAYLOAD_FORMAT_INVALID: u8 = 0x99;
pub const RETAIN_NOT_SUPPORTED: u8 = 0x9A;
pub const QOS_NOT_SUPPORTED: u8 = 0x9B;
pub const SHARED_SUBSCRIPTIONS_NOT_SUPPORTED: u8 = 0x9E;
pub const CONNECTION_RATE_EXCEEDED: u8 = 0x9F;
pub const MAXIMUM_CONNECT_TIME: u8 = 0xA0;
pub const SUBSCRIPTION_IDS_NOT_SUPPORTED: u8 = 0xA1;
pub const WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED: u8 = 0xA2;

/// Map a 5.0 CONNACK reason code to the closest 3.1.1 return code.
pub fn connack_v4(code: u8) -> u8 {
    match code {
        SUCCESS => 0,
        UNSUPPORTED_PROTOCOL_VERSION => 1,
        CLIENT_ID_NOT_VALID => 2,
        SERVER_UNAVAILABLE | SERVER_BUSY | QUOTA_EXCEEDED | CONNECTION_RATE_EXCEEDED | SERVER_SHUTTING_DOWN => 3,
        BAD_USERNAME_OR_PASSWORD => 4,
        _ => 5,
    }
}

/// The reason code's name in snake case (metrics labels, logs); `other` for unknown codes.
pub fn name(code: u8) -> &'static str {
    match code {
        SUCCESS => "success",
        GRANTED_QOS_1 => "granted_qos_1",
        GRANTED_QOS_2 => "granted_qos_2",
        DISCONNECT_WITH_WILL => "disconnect_with_will",
        NO_MATCHING_SUBSCRIBERS => "no_matching_subscribers",
        NO_SUBSCRIPTION_EXISTED => "no_subscription_existed",
        UNSPECIFIED_ERROR => "unspecified_error",
        MALFORMED_PACKET => "malformed_packet",
        PROTOCOL_ERROR => "protocol_error",
        IMPLEMENTATION_SPECIFIC => "implementation_specific_error",
        UNSUPPORTED_PROTOCOL_VERSION => "unsupported_protocol_version",
        CLIENT_ID_NOT_VALID => "client_identifier_not_valid",
        BAD_USERNAME_OR_PASSWORD => "bad_username_or_password",
        NOT_AUTHORIZED => "not_authorized",
        SERVER_UNAVAILABLE => "server_unavailable",
        SERVER_BUSY => "server_busy",
        BANNED => "banned",
        SERVER_SHUTTING_DOWN => "server_shutting_down",
        BAD_AUTHENTICATION_METHOD => "bad_authentication_method",
        KEEP_ALIVE_TIMEOUT => "keep_alive_timeout",
        SESSION_TAKEN_OVER => "session_taken_over",
        TOPIC_FILTER_INVALID => "topic_filter_invalid",
        TOPIC_NAME_INVALID => "topic_name_invalid",
        PACKET_ID_IN_USE => "packet_identifier_in_use",
        PACKET_ID_NOT_FOUND => "packet_identifier_not_found",
        RECEIVE_MAXIMUM_EXCEEDED => "receive_maximum_exceeded",
        TOPIC_ALIAS_INVALID => "topic_alias_invalid",
        PACKET_TOO_LARGE => "packet_too_large",
        MESSAGE_RATE_TOO_HIGH => "message_rate_too_high",
        QUOTA_EXCEEDED => "quota_exceeded",
        ADMINISTRATIVE_ACTION => "administrative_action",
        PAYLOAD_FORMAT_INVALID => "payload_format_invalid",
        RETAIN_NOT_SUPPORTED => "retain_not_supported",
        QOS_NOT_SUPPORTED => "qos_not_supported",
        SHARED_SUBSCRIPTIONS_NOT_SUPPORTED => "shared_subscriptions_not_supported",
        CONNECTION_RATE_EXCEEDED => "connection_rate_exceeded",
        MAXIMUM_CONNECT_TIME => "maximum_connect_time",
        SUBSCRIPTION_IDS_NOT_SUPPORTED => "subscription_identifiers_not_supported",
        WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED => "wildcard_subscriptions_not_supported",
        _ => "other",
    }
}

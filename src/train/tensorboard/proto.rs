//! The few protobuf messages of a TensorBoard event file, encoded by hand: `Event` (wall_time,
//! step, file_version or summary), `Summary` and `Summary.Value` (tag, simple_value), with the
//! field numbers of tensorflow/core/util/event.proto and tensorflow/core/framework/summary.proto.
//! Five fields do not justify a protobuf code generator (prost + prost-build + a .proto copy).
//! Encodes only; never reads.

/// Wire types.
const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LENGTH_DELIMITED: u8 = 2;
const FIXED32: u8 = 5;

fn key(out: &mut Vec<u8>, field: u32, wire_type: u8) {
    varint(out, u64::from(field << 3 | u32::from(wire_type)));
}

fn varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn bytes_field(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    key(out, field, LENGTH_DELIMITED);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// What an event carries besides its time and step.
#[derive(Debug, Clone, PartialEq)]
pub enum What<'a> {
    /// `file_version` (field 3): the first event of a file, `brain.Event:2`.
    FileVersion(&'a str),
    /// `summary` (field 5) with one `simple_value` per `(tag, value)`.
    Scalars(&'a [(&'a str, f32)]),
}

/// An encoded `Event { wall_time = 1; step = 2; file_version = 3 | summary = 5 }`.
pub fn event(wall_time: f64, step: i64, what: &What<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    key(&mut out, 1, FIXED64);
    out.extend_from_slice(&wall_time.to_le_bytes());
    key(&mut out, 2, VARINT);
    // int64: negative values as their two's complement (ten bytes), as protobuf does.
    varint(&mut out, step as u64);
    match what {
        What::FileVersion(version) => bytes_field(&mut out, 3, version.as_bytes()),
        What::Scalars(values) => bytes_field(&mut out, 5, &summary(values)),
    }
    out
}

/// An encoded `Summary { repeated Value value = 1 }`, each `Value { tag = 1; simple_value = 2 }`.
fn summary(values: &[(&str, f32)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (tag, value) in values {
        let mut encoded = Vec::new();
        bytes_field(&mut encoded, 1, tag.as_bytes());
        key(&mut encoded, 2, FIXED32);
        encoded.extend_from_slice(&value.to_le_bytes());
        bytes_field(&mut out, 1, &encoded);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_as_protobuf_writes_them() {
        let encode = |value: u64| {
            let mut out = Vec::new();
            varint(&mut out, value);
            out
        };
        assert_eq!(encode(0), [0x00]);
        assert_eq!(encode(1), [0x01]);
        assert_eq!(encode(150), [0x96, 0x01]);
        assert_eq!(encode(300), [0xac, 0x02]);
        assert_eq!(encode(u64::MAX).len(), 10);
    }

    #[test]
    fn the_file_version_event() {
        // Event { wall_time: 0.0, step: 0, file_version: "brain.Event:2" }, byte for byte.
        let mut expected = vec![0x09, 0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0x00, 0x1a, 13];
        expected.extend_from_slice(b"brain.Event:2");
        assert_eq!(event(0.0, 0, &What::FileVersion("brain.Event:2")), expected);
    }

    #[test]
    fn a_scalar_event() {
        let encoded = event(1.5, 300, &What::Scalars(&[("loss", 0.25)]));
        let mut expected = vec![0x09];
        expected.extend_from_slice(&1.5f64.to_le_bytes());
        expected.extend_from_slice(&[0x10, 0xac, 0x02]);
        // summary (field 5, 13 bytes) → value (field 1, 11 bytes) → tag "loss", simple_value.
        expected.extend_from_slice(&[0x2a, 13, 0x0a, 11, 0x0a, 4]);
        expected.extend_from_slice(b"loss");
        expected.push(0x15);
        expected.extend_from_slice(&0.25f32.to_le_bytes());
        assert_eq!(encoded, expected);
    }
}

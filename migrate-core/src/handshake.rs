//! Driving the handshake codecs over blocking streams.

use std::io::Write;

use uring_net::{FrameReader, Stream};

use crate::error::MigrateError;
use crate::memory::GuestMemory;
use crate::protocol::handshake::{HELLO_HEADER_LEN, REPLY_HEADER_LEN};
use crate::protocol::{Channel, Hello, HelloReply, ProtocolError, RegionInfo, RegionTable};

/// The region table describing `memory`.
pub fn region_table(memory: &GuestMemory) -> RegionTable {
    let regions = memory
        .regions()
        .iter()
        .map(|r| RegionInfo {
            id: r.id(),
            name: r.name().to_owned(),
            host_page_size: r.host_page_size() as u32,
            len: r.len() as u64,
        })
        .collect();
    // GuestMemory enforces the same rules (ids 0..n, unique non-empty names, page multiples).
    RegionTable::new(regions).expect("GuestMemory always yields a valid region table")
}

fn write_all(stream: &Stream, bytes: &[u8]) -> Result<(), MigrateError> {
    let mut s = stream;
    s.write_all(bytes)
        .map_err(|e| MigrateError::Net(uring_net::NetError::from_io(e, false)))
}

/// Source side: send our hello on `stream` and wait for the destination's verdict.
pub fn source_handshake(
    stream: &Stream,
    channel: Channel,
    session: u64,
    table: &RegionTable,
) -> Result<(), MigrateError> {
    write_all(
        stream,
        &Hello::new(channel, session, table.clone()).encode(),
    )?;
    let mut reader = FrameReader::new(stream.try_clone()?, REPLY_HEADER_LEN);
    let Some(hdr) = reader.read_header::<REPLY_HEADER_LEN>()? else {
        return Err(MigrateError::Remote(
            "the destination closed the connection during the handshake".into(),
        ));
    };
    let len = HelloReply::message_len(&hdr)?;
    let mut msg = vec![0; len];
    reader.read_exact(&mut msg)?;
    HelloReply::decode(&hdr, &msg)?.into_result()?;
    Ok(())
}

/// Destination side: read a hello from `reader`, check it against our table, answer.
/// Returns the channel and session on success; on a mismatch the source is told why.
pub fn dest_handshake(
    reader: &mut FrameReader,
    ours: &RegionTable,
) -> Result<(Channel, u64), MigrateError> {
    let result = read_hello(reader).and_then(|h| {
        ours.check_matches(&h.regions)?;
        Ok((h.channel, h.session))
    });
    let stream = reader.stream();
    match result {
        Ok(v) => {
            write_all(stream, &HelloReply::ok().encode())?;
            Ok(v)
        }
        Err(MigrateError::Protocol(e)) => {
            let _ = write_all(stream, &HelloReply::refuse(&e).encode());
            Err(MigrateError::Protocol(e))
        }
        Err(e) => Err(e),
    }
}

fn read_hello(reader: &mut FrameReader) -> Result<Hello, MigrateError> {
    let Some(hdr) = reader.read_header::<HELLO_HEADER_LEN>()? else {
        return Err(ProtocolError::Handshake("connection closed before the hello".into()).into());
    };
    let len = Hello::body_len(&hdr)?;
    let mut body = vec![0; len];
    reader.read_exact(&mut body)?;
    Ok(Hello::decode(&hdr, &body)?)
}

/// Refuses an extra connection for a channel that is already connected.
pub fn refuse(stream: &Stream, e: &ProtocolError) {
    let _ = write_all(stream, &HelloReply::refuse(e).encode());
}

//! Driving the handshake codecs over blocking streams (see [`crate::protocol::handshake`] for
//! the message sequence).

use std::io::Write;

use uring_net::{FrameReader, Stream};

use crate::error::MigrateError;
use crate::memory::GuestMemory;
use crate::protocol::auth::{self, AuthKey, Role, PROOF_LEN};
use crate::protocol::handshake::{
    CHALLENGE_LEN, HELLO_AUTH, HELLO_HEADER_LEN, HELLO_RESUME, REPLY_HEADER_LEN,
};
use crate::protocol::{
    Challenge, Channel, Hello, HelloReply, ProtocolError, RegionInfo, RegionTable,
};

/// The region table describing `memory`; an error if a region cannot be described on the
/// wire (e.g. a borrowed region with an unusual page size).
pub fn region_table(memory: &GuestMemory) -> Result<RegionTable, ProtocolError> {
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
    RegionTable::new(regions)
}

fn write_all(stream: &Stream, bytes: &[u8]) -> Result<(), MigrateError> {
    let mut s = stream;
    s.write_all(bytes)
        .map_err(|e| MigrateError::Net(uring_net::NetError::from_io(e, false)))
}

fn read_reply(reader: &mut FrameReader) -> Result<HelloReply, MigrateError> {
    let Some(hdr) = reader.read_header::<REPLY_HEADER_LEN>()? else {
        return Err(MigrateError::Remote(
            "the destination closed the connection during the handshake".into(),
        ));
    };
    let len = HelloReply::message_len(&hdr)?;
    let mut msg = vec![0; len];
    reader.read_exact(&mut msg)?;
    Ok(HelloReply::decode(&hdr, &msg)?)
}

/// What the source asks for on one connection.
pub struct SourceHello<'a> {
    pub channel: Channel,
    pub session: u64,
    pub table: &'a RegionTable,
    pub key: Option<&'a AuthKey>,
    pub resume: bool,
}

/// Source side of the handshake on `stream`: hello, check the destination's proof, prove,
/// wait for the verdict. Returns the reader positioned after the handshake.
pub fn source_handshake(stream: &Stream, h: &SourceHello<'_>) -> Result<FrameReader, MigrateError> {
    let mut hello = Hello::new(h.channel, h.session, h.table.clone());
    hello.nonce = auth::nonce();
    hello.flags =
        if h.key.is_some() { HELLO_AUTH } else { 0 } | if h.resume { HELLO_RESUME } else { 0 };
    write_all(stream, &hello.encode())?;
    let mut reader = FrameReader::new(stream.try_clone()?, 4096);
    read_reply(&mut reader)?.into_result()?;
    let mut c = [0u8; CHALLENGE_LEN];
    reader.read_exact(&mut c)?;
    let challenge = Challenge::decode(&c);
    let ch = h.channel as u8;
    let proof = match h.key {
        Some(key) => {
            if !auth::check(
                key,
                Role::Destination,
                ch,
                h.session,
                &hello.nonce,
                &challenge.nonce,
                &challenge.proof,
            ) {
                // Tell the destination too (an all-zero proof fails its check, so it refuses
                // with a reason instead of seeing the connection drop).
                let _ = write_all(stream, &[0; PROOF_LEN]);
                return Err(ProtocolError::Auth(
                    "the destination could not prove it holds the key (wrong key, or none configured there)".into(),
                )
                .into());
            }
            auth::prove(
                key,
                Role::Source,
                ch,
                h.session,
                &hello.nonce,
                &challenge.nonce,
            )
        }
        None => [0; PROOF_LEN],
    };
    write_all(stream, &proof)?;
    read_reply(&mut reader)?.into_result()?;
    Ok(reader)
}

/// Destination side: read a hello, prove our key, check the source's proof, check its region
/// table against ours and let `admit` decide about the channel and session (duplicates,
/// resumes). On any refusal the source is told why before the error is returned.
pub fn dest_handshake(
    reader: &mut FrameReader,
    ours: &RegionTable,
    key: Option<&AuthKey>,
    admit: impl FnOnce(&Hello) -> Result<(), ProtocolError>,
) -> Result<Hello, MigrateError> {
    let hello = match read_hello(reader) {
        Ok(h) => h,
        Err(MigrateError::Protocol(e)) => {
            refuse(reader.stream(), &e);
            return Err(e.into());
        }
        Err(e) => return Err(e),
    };
    write_all(reader.stream(), &HelloReply::ok().encode())?;
    let nonce = auth::nonce();
    let ch = hello.channel as u8;
    let proof = key.map_or([0; PROOF_LEN], |k| {
        auth::prove(
            k,
            Role::Destination,
            ch,
            hello.session,
            &hello.nonce,
            &nonce,
        )
    });
    write_all(reader.stream(), &Challenge { nonce, proof }.encode())?;
    let mut theirs = [0u8; PROOF_LEN];
    reader.read_exact(&mut theirs)?;
    let verdict = match key {
        Some(_) if !hello.auth() => Err(ProtocolError::Auth(
            "the source has no key; this destination requires one".into(),
        )),
        Some(k)
            if !auth::check(
                k,
                Role::Source,
                ch,
                hello.session,
                &hello.nonce,
                &nonce,
                &theirs,
            ) =>
        {
            Err(ProtocolError::Auth(
                "wrong key: the source's proof does not match".into(),
            ))
        }
        None if hello.auth() => Err(ProtocolError::Auth(
            "the source expects a key; this destination has none".into(),
        )),
        _ => Ok(()),
    }
    .and_then(|_| ours.check_matches(&hello.regions))
    .and_then(|_| admit(&hello));
    match verdict {
        Ok(()) => {
            write_all(reader.stream(), &HelloReply::ok().encode())?;
            Ok(hello)
        }
        Err(e) => {
            refuse(reader.stream(), &e);
            Err(e.into())
        }
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

/// Tells the peer why its connection is refused (best effort).
pub fn refuse(stream: &Stream, e: &ProtocolError) {
    let _ = write_all(stream, &HelloReply::refuse(e).encode());
}

//! Writes the seed corpora under `fuzz/corpus/<target>/` from valid encodings (plus a few
//! near-misses). Run from `fuzz/`: `cargo run --example gen_corpus`.

use std::path::Path;

use migrate_core::protocol::handshake::REPLY_HEADER_LEN;
use migrate_core::protocol::{
    Channel, DiscardEntry, Hello, HelloReply, ProtocolError, Record, ReturnMsg,
};
use migrate_fuzz::{sample_records, table};

fn write(target: &str, seeds: &[Vec<u8>]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    std::fs::create_dir_all(&dir).unwrap();
    assert!(seeds.len() <= 20, "keep seed corpora small");
    for (i, s) in seeds.iter().enumerate() {
        std::fs::write(dir.join(format!("seed-{i:02}")), s).unwrap();
    }
}

fn main() {
    let t = table();
    let mut seeds: Vec<Vec<u8>> = sample_records().iter().map(|r| r.encode().to_vec()).collect();
    let mut past = Record::Pages {
        region: 0,
        offset: 1 << 20,
        len: 4096,
    }
    .encode();
    seeds.push(past.to_vec());
    past[0] = 0x42;
    seeds.push(past.to_vec());
    write("record_header", &seeds);

    let rets = [
        ReturnMsg::Request {
            region: 0,
            offset: 8192,
            len: 4096,
        },
        ReturnMsg::Request {
            region: 1,
            offset: 2 << 20,
            len: 2 << 20,
        },
        ReturnMsg::Done { verified: None },
        ReturnMsg::Done {
            verified: Some(true),
        },
        ReturnMsg::Done {
            verified: Some(false),
        },
    ];
    let mut seeds: Vec<Vec<u8>> = rets.iter().map(|m| m.encode().to_vec()).collect();
    seeds.push(ReturnMsg::encode_error("boom")[..16].to_vec());
    write("return_msg", &seeds);

    let mut seeds = Vec::new();
    for (ch, session) in [(Channel::Main, 1u64), (Channel::Urgent, 0xdead_beef)] {
        let bytes = Hello::new(ch, session, t.clone()).encode();
        seeds.push(bytes.clone());
        seeds.push(bytes[..bytes.len() - 3].to_vec());
    }
    let one = migrate_core::protocol::RegionTable::new(vec![t.regions()[0].clone()]).unwrap();
    seeds.push(Hello::new(Channel::Main, 7, one).encode());
    write("hello", &seeds);

    let replies = [
        HelloReply::ok(),
        HelloReply::refuse(&ProtocolError::Version { ours: 1, theirs: 2 }),
        HelloReply::refuse(&ProtocolError::RegionMismatch("region 0 differs".into())),
        HelloReply::refuse(&ProtocolError::DuplicateChannel("main")),
    ];
    let mut seeds: Vec<Vec<u8>> = replies.iter().map(|r| r.encode()).collect();
    let mut short = HelloReply::refuse(&ProtocolError::Handshake("x".into())).encode();
    short.truncate(REPLY_HEADER_LEN);
    seeds.push(short);
    write("hello_reply", &seeds);

    let entries = [
        DiscardEntry {
            region: 0,
            pages: 1,
            offset: 0,
        },
        DiscardEntry {
            region: 0,
            pages: 256,
            offset: 0,
        },
        DiscardEntry {
            region: 1,
            pages: 2,
            offset: 4 << 20,
        },
        DiscardEntry {
            region: 1,
            pages: 3,
            offset: 4 << 20,
        },
    ];
    let mut seeds: Vec<Vec<u8>> = entries.iter().map(|e| e.encode().to_vec()).collect();
    seeds.push(DiscardEntry::encode_all(&entries));
    write("discard_entry", &seeds);

    // Phase: selector byte (bit 0 = urgent) + header, per step.
    let step = |urgent: bool, r: Record| {
        let mut v = vec![urgent as u8];
        v.extend_from_slice(&r.encode());
        v
    };
    let page = Record::Pages {
        region: 0,
        offset: 0,
        len: 4096,
    };
    let happy: Vec<u8> = [
        step(false, page),
        step(false, Record::Discard { count: 1 }),
        step(false, Record::Postcopy),
        step(true, page),
        step(false, Record::Run),
        step(false, page),
        step(
            false,
            Record::Digests {
                region: 0,
                offset: 0,
                count: 1,
            },
        ),
        step(false, Record::End),
        step(true, page),
    ]
    .concat();
    let early_urgent: Vec<u8> = [step(true, page), step(false, Record::Run)].concat();
    let pure_postcopy: Vec<u8> = [
        step(false, Record::Postcopy),
        step(false, Record::Run),
        step(false, Record::Ping),
        step(false, Record::End),
        step(false, Record::Ping),
    ]
    .concat();
    write("phase", &[happy, early_urgent, pure_postcopy]);
}

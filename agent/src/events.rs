//! Datapath events (drops and policy verdicts): read from the `events` ring buffer and fanned
//! out to whoever streams `GET /v1/events` (`myelinctl monitor`). The datapath only emits them
//! while at least one stream is open, so they cost nothing otherwise.

use std::net::Ipv4Addr;

use aya::maps::{MapData, RingBuf};
use myelin_common::{
    Direction, DropReason,
    event::{EVENT_DROP, FlowEvent as RawEvent},
    proto::{IPPROTO_ICMP, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP},
};
use tokio::{io::unix::AsyncFd, sync::broadcast};
use tracing::warn;

/// Fan-out of events to API streams.
pub type EventSender = broadcast::Sender<myelin_api::FlowEvent>;

/// Events buffered per slow reader before it starts missing some.
pub const STREAM_BUFFER: usize = 4096;

pub fn protocol_name(protocol: u8) -> String {
    match protocol {
        IPPROTO_ICMP => "icmp".into(),
        IPPROTO_TCP => "tcp".into(),
        IPPROTO_UDP => "udp".into(),
        IPPROTO_SCTP => "sctp".into(),
        n => n.to_string(),
    }
}

/// `ip:port`, or `ip` for protocols without ports.
pub fn endpoint(ip: Ipv4Addr, port: u16, protocol: u8) -> String {
    match protocol {
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP => format!("{ip}:{port}"),
        _ => ip.to_string(),
    }
}

pub fn to_api(e: &RawEvent) -> myelin_api::FlowEvent {
    let drop = e.kind == EVENT_DROP;
    myelin_api::FlowEvent {
        kind: if drop { "drop" } else { "allowed" }.to_string(),
        reason: drop.then(|| {
            DropReason::from_u32(u32::from(e.reason))
                .map_or_else(|| format!("reason-{}", e.reason), |r| r.name().to_string())
        }),
        direction: if e.direction == Direction::Ingress as u8 {
            "ingress"
        } else {
            "egress"
        }
        .to_string(),
        protocol: protocol_name(e.protocol),
        src: endpoint(Ipv4Addr::from(e.saddr), e.sport, e.protocol),
        dst: endpoint(Ipv4Addr::from(e.daddr), e.dport, e.protocol),
        src_endpoint: e.src_endpoint,
        dst_endpoint: e.dst_endpoint,
        src_identity: e.src_identity,
        dst_identity: e.dst_identity,
        service: (e.service_addr != [0; 4])
            .then(|| endpoint(Ipv4Addr::from(e.service_addr), e.service_port, e.protocol)),
    }
}

/// Reads the ring buffer until the process ends, forwarding every event.
pub async fn read(ring: RingBuf<MapData>, tx: EventSender) {
    // SAFETY: the ring buffer owns its map file descriptor, which stays open and the same for
    // as long as the `AsyncFd` holds the ring buffer.
    let registered =
        unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            warn!("cannot poll the events ring buffer: {e}; no events will be reported");
            return;
        }
    };

    loop {
        let mut guard = match fd.readable_mut().await {
            Ok(g) => g,
            Err(e) => {
                warn!("polling the events ring buffer failed: {e}");
                return;
            }
        };
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            if item.len() < std::mem::size_of::<RawEvent>() {
                continue;
            }
            // SAFETY: the datapath writes whole `FlowEvent` records (checked length above).
            let raw: RawEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            // No receiver is fine: nobody is watching right now.
            let _ = tx.send(to_api(&raw));
        }
        guard.clear_ready();
    }
}

#[cfg(test)]
mod tests {
    use myelin_common::event::EVENT_ALLOWED;

    use super::*;

    #[test]
    fn events_read_like_a_flow_log() {
        let raw = RawEvent {
            kind: EVENT_DROP,
            reason: DropReason::PolicyDeniedIngress as u8,
            direction: Direction::Ingress as u8,
            protocol: IPPROTO_TCP,
            saddr: [10, 0, 0, 2],
            daddr: [10, 0, 0, 3],
            sport: 40000,
            dport: 80,
            src_endpoint: 1,
            dst_endpoint: 2,
            src_identity: 300,
            dst_identity: 301,
            ..Default::default()
        };
        let e = to_api(&raw);
        assert_eq!(e.kind, "drop");
        assert_eq!(e.reason.as_deref(), Some("policy-denied-ingress"));
        assert_eq!(
            (e.src.as_str(), e.dst.as_str()),
            ("10.0.0.2:40000", "10.0.0.3:80")
        );
        let icmp = to_api(&RawEvent {
            kind: EVENT_ALLOWED,
            protocol: IPPROTO_ICMP,
            ..raw
        });
        assert_eq!(
            (icmp.kind.as_str(), icmp.reason, icmp.dst.as_str()),
            ("allowed", None, "10.0.0.3")
        );
        assert_eq!(e.service, None);
        let translated = to_api(&RawEvent {
            kind: EVENT_ALLOWED,
            service_addr: [10, 96, 0, 10],
            service_port: 443,
            ..raw
        });
        assert_eq!(translated.service.as_deref(), Some("10.96.0.10:443"));
        assert!(
            translated
                .to_string()
                .ends_with("(service 10.96.0.10:443 -> 10.0.0.3:80)"),
            "{translated}"
        );
    }
}

//! The TCP rendezvous: rank 0 listens on `MASTER_ADDR:MASTER_PORT`, every other rank connects
//! (retrying until its deadline, since rank 0 may start later) and says its rank and world size;
//! once each of ranks 1..W has arrived exactly once with the same world size, rank 0 sends every
//! one the same opaque payload (the NCCL id) and a run token. Nothing else goes over it: NCCL
//! does the real communication.
//!
//! Everything that can go wrong ends the meeting for all with a message naming the address and
//! the ranks: ranks that did not arrive by the deadline (rank 0 tells those that did), a rank
//! arriving twice, a world-size mismatch, a peer that is not a nopad rank, rank 0 unreachable,
//! silent, or failing to make the payload. A rank that rank 0 turns away gets rank 0's reason.
//!
//! Wire format (little-endian): hello = `MAGIC`, rank u32, world size u32; answer = `MAGIC`,
//! then `0`, token u64, payload length u32, payload; or `1`, reason length u32, reason (UTF-8).

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use super::env::{env_lookup, host_port, timeout_from, RENDEZVOUS_TIMEOUT_VAR};
use super::{DistError, World};

/// Opens every hello and answer (the protocol's name and version).
const MAGIC: &[u8; 8] = b"NOPADRV1";
const ACCEPTED: u8 = 0;
const REFUSED: u8 = 1;
/// Largest payload or reason accepted from the wire (an NCCL id is 128 bytes).
const MAX_LEN: usize = 1 << 20;
/// Longest wait for a connected peer's hello (a silent peer must not use up the deadline).
const HELLO_WAIT: Duration = Duration::from_secs(10);

/// Timeouts of the rendezvous.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RendezvousOptions {
    /// How long rank 0 waits for every rank, and every rank for rank 0's answer.
    pub timeout: Duration,
    /// Pause between two connection attempts to a rank 0 that is not listening yet.
    pub retry: Duration,
}

impl Default for RendezvousOptions {
    fn default() -> Self {
        RendezvousOptions {
            timeout: Duration::from_secs(300),
            retry: Duration::from_millis(100),
        }
    }
}

impl RendezvousOptions {
    /// The defaults, with the timeout from `NOPAD_RENDEZVOUS_TIMEOUT` (seconds) when set.
    pub fn from_env() -> Result<Self, DistError> {
        Self::from_lookup(env_lookup)
    }

    /// As [`RendezvousOptions::from_env`], reading variables through `get`.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, DistError> {
        let default = Self::default();
        Ok(RendezvousOptions {
            timeout: timeout_from(get, RENDEZVOUS_TIMEOUT_VAR, default.timeout)?,
            ..default
        })
    }
}

/// What every rank leaves the rendezvous with: rank 0's payload and the run's token (the same
/// on every rank, different for every run).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Meeting {
    /// The bytes rank 0 handed out.
    pub payload: Vec<u8>,
    /// A number rank 0 drew for this run.
    pub token: u64,
}

/// Meets the other ranks of `world`: rank 0 serves (making the payload once every rank has
/// arrived), the others join. A world of one meets nobody.
pub fn rendezvous(
    world: &World,
    payload: impl FnOnce() -> Result<Vec<u8>, DistError>,
    opts: &RendezvousOptions,
) -> Result<Meeting, DistError> {
    if world.world_size == 1 {
        return Ok(Meeting {
            payload: payload()?,
            token: new_token(),
        });
    }
    if world.rank == 0 {
        Server::bind(&world.master_addr, world.master_port)?.serve(world.world_size, payload, opts)
    } else {
        join(
            &world.master_addr,
            world.master_port,
            world.rank,
            world.world_size,
            opts,
        )
    }
}

/// Rank 0's side: a listening socket.
pub(super) struct Server {
    listener: TcpListener,
    /// `MASTER_ADDR:MASTER_PORT` as the ranks were told, for messages.
    addr: String,
}

/// A rank that has arrived.
struct Peer {
    stream: TcpStream,
    from: SocketAddr,
}

impl Server {
    /// Listens for the rendezvous at `host:port`: only on loopback when `host` is a loopback
    /// address or `localhost` (a run on one host), else on every interface, as torchrun does
    /// (the name other hosts reach may resolve to something else here, such as the 127.0.1.1
    /// some distributions give the host's own name). Port 0 picks a free port.
    pub fn bind(host: &str, port: u16) -> Result<Server, DistError> {
        let addr = host_port(host, port);
        let local = match host.trim_matches(['[', ']']).parse::<IpAddr>() {
            Ok(ip) if ip.is_loopback() => ip,
            Ok(IpAddr::V6(_)) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            Ok(IpAddr::V4(_)) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            Err(_) if host.eq_ignore_ascii_case("localhost") => IpAddr::V4(Ipv4Addr::LOCALHOST),
            Err(_) => {
                let first = (host, port)
                    .to_socket_addrs()
                    .ok()
                    .and_then(|mut a| a.next());
                match first.map(|a| a.ip()) {
                    Some(IpAddr::V6(_)) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
                    _ => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                }
            }
        };
        let listener = TcpListener::bind((local, port)).map_err(|e| {
            DistError::Rendezvous(format!(
                "rank 0 cannot listen on port {port} for the rendezvous at {addr}: {e} (is \
                 MASTER_PORT taken by another program or an earlier run?)"
            ))
        })?;
        // Port 0 (tests) picked a port: name the one the ranks must reach.
        let port = listener.local_addr().map_or(port, |a| a.port());
        Ok(Server {
            listener,
            addr: host_port(host, port),
        })
    }

    /// Waits until ranks 1..world_size have each arrived once, then makes the payload and sends
    /// it with a fresh token to all of them. On any failure every rank that arrived is told why.
    pub fn serve(
        self,
        world_size: usize,
        payload: impl FnOnce() -> Result<Vec<u8>, DistError>,
        opts: &RendezvousOptions,
    ) -> Result<Meeting, DistError> {
        let deadline = Instant::now() + opts.timeout;
        let io =
            |e: std::io::Error| DistError::Rendezvous(format!("rendezvous at {}: {e}", self.addr));
        self.listener.set_nonblocking(true).map_err(io)?;
        let mut peers = BTreeMap::new();
        while peers.len() + 1 < world_size {
            match self.listener.accept() {
                Ok((stream, from)) => {
                    if let Err(msg) = self.admit(stream, from, world_size, &mut peers, deadline) {
                        return Err(refuse_all(&mut peers, msg));
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        let msg = self.missing(world_size, &peers, opts.timeout);
                        return Err(refuse_all(&mut peers, msg));
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(refuse_all(&mut peers, io(e).to_string())),
            }
        }
        let payload = match payload() {
            Ok(p) if p.len() <= MAX_LEN => p,
            Ok(p) => {
                let msg = format!(
                    "rank 0 made a payload of {} bytes (at most {MAX_LEN})",
                    p.len()
                );
                return Err(refuse_all(&mut peers, msg));
            }
            Err(e) => {
                refuse_all(&mut peers, format!("rank 0 failed: {e}"));
                return Err(e);
            }
        };
        let token = new_token();
        let mut answer = MAGIC.to_vec();
        answer.push(ACCEPTED);
        answer.extend_from_slice(&token.to_le_bytes());
        answer.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        answer.extend_from_slice(&payload);
        for (rank, peer) in &mut peers {
            peer.stream.write_all(&answer).map_err(|e| {
                DistError::Rendezvous(format!(
                    "rendezvous at {}: cannot answer rank {rank} at {}: {e}",
                    self.addr, peer.from
                ))
            })?;
        }
        Ok(Meeting { payload, token })
    }

    /// Reads a new connection's hello and adds it to `peers`, or says why the meeting ends.
    fn admit(
        &self,
        mut stream: TcpStream,
        from: SocketAddr,
        world_size: usize,
        peers: &mut BTreeMap<usize, Peer>,
        deadline: Instant,
    ) -> Result<(), String> {
        let wait = deadline
            .saturating_duration_since(Instant::now())
            .clamp(Duration::from_millis(10), HELLO_WAIT);
        let mut hello = [0u8; 16];
        let read = stream
            .set_nonblocking(false)
            .and_then(|()| stream.set_read_timeout(Some(wait)))
            .and_then(|()| stream.read_exact(&mut hello));
        if let Err(e) = read {
            return Err(format!(
                "rendezvous at {}: a peer at {from} connected but did not introduce itself \
                 ({e}); is another program connecting to MASTER_PORT?",
                self.addr
            ));
        }
        if &hello[..8] != MAGIC {
            return Err(format!(
                "rendezvous at {}: a peer at {from} is not a nopad rank (it sent \"{}\"); is \
                 another program using MASTER_PORT?",
                self.addr,
                String::from_utf8_lossy(&hello).escape_debug()
            ));
        }
        let rank = u32_at(&hello, 8) as usize;
        let size = u32_at(&hello, 12) as usize;
        let why = if size != world_size {
            Some(format!(
                "rank {rank} at {from} has WORLD_SIZE={size}, rank 0 has WORLD_SIZE={world_size}"
            ))
        } else if rank == 0 || rank >= world_size {
            Some(format!(
                "a peer at {from} says it is rank {rank}, not one of 1..{world_size}"
            ))
        } else {
            peers.get(&rank).map(|first| {
                format!(
                    "rank {rank} arrived twice, from {} and from {from}: every process needs \
                     its own RANK",
                    first.from
                )
            })
        };
        if let Some(why) = why {
            let msg = format!("rendezvous at {}: {why}", self.addr);
            refuse(&mut stream, &msg);
            return Err(msg);
        }
        peers.insert(rank, Peer { stream, from });
        Ok(())
    }

    /// The timeout message: which ranks are missing and which arrived.
    fn missing(
        &self,
        world_size: usize,
        peers: &BTreeMap<usize, Peer>,
        timeout: Duration,
    ) -> String {
        let missing: Vec<String> = (1..world_size)
            .filter(|r| !peers.contains_key(r))
            .map(|r| r.to_string())
            .collect();
        let arrived: Vec<String> = std::iter::once("0".to_string())
            .chain(peers.keys().map(|r| r.to_string()))
            .collect();
        format!(
            "rendezvous at {}: rank{} {} did not arrive within {timeout:?} (arrived: {}); start \
             every rank with the same MASTER_ADDR, MASTER_PORT and WORLD_SIZE={world_size}, or \
             wait longer with {RENDEZVOUS_TIMEOUT_VAR}",
            self.addr,
            if missing.len() == 1 { "" } else { "s" },
            missing.join(", "),
            arrived.join(", ")
        )
    }
}

/// Tells every peer why the meeting ended; returns the error.
fn refuse_all(peers: &mut BTreeMap<usize, Peer>, msg: String) -> DistError {
    for peer in peers.values_mut() {
        refuse(&mut peer.stream, &msg);
    }
    DistError::Rendezvous(msg)
}

/// Sends a refusal; a peer that has gone needs no reason.
fn refuse(stream: &mut TcpStream, msg: &str) {
    let mut answer = MAGIC.to_vec();
    answer.push(REFUSED);
    answer.extend_from_slice(&(msg.len() as u32).to_le_bytes());
    answer.extend_from_slice(msg.as_bytes());
    let _ = stream.write_all(&answer);
}

/// Another rank's side: connects to rank 0 at `host:port` (retrying until the deadline),
/// introduces itself as `rank` of `world_size` and waits for the payload.
pub(super) fn join(
    host: &str,
    port: u16,
    rank: usize,
    world_size: usize,
    opts: &RendezvousOptions,
) -> Result<Meeting, DistError> {
    let addr = host_port(host, port);
    let fail = |msg: String| DistError::Rendezvous(format!("rank {rank}: {msg}"));
    let deadline = Instant::now() + opts.timeout;
    let mut stream = loop {
        let last = match connect(host, port, deadline) {
            Ok(s) => break s,
            Err(e) => e,
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(fail(format!(
                "could not reach rank 0's rendezvous at {addr} within {:?} ({last}); is rank 0 \
                 running, and do all ranks have the same MASTER_ADDR and MASTER_PORT? \
                 ({RENDEZVOUS_TIMEOUT_VAR} waits longer)",
                opts.timeout
            )));
        }
        std::thread::sleep(opts.retry.min(left));
    };
    let mut hello = MAGIC.to_vec();
    hello.extend_from_slice(&(rank as u32).to_le_bytes());
    hello.extend_from_slice(&(world_size as u32).to_le_bytes());
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(10));
    stream
        .set_read_timeout(Some(left))
        .and_then(|()| stream.write_all(&hello))
        .map_err(|e| fail(format!("cannot talk to rank 0 at {addr}: {e}")))?;
    let answer_err = |e: std::io::Error| match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => fail(format!(
            "reached rank 0 at {addr}, but it did not answer within {:?}: it answers once all \
             {world_size} ranks have arrived (is every rank started, with WORLD_SIZE={world_size}? \
             {RENDEZVOUS_TIMEOUT_VAR} waits longer)",
            opts.timeout
        )),
        ErrorKind::UnexpectedEof => fail(format!(
            "{addr} closed the connection without answering (did rank 0 fail, or is another \
             program on MASTER_PORT?)"
        )),
        _ => fail(format!("reading rank 0's answer from {addr}: {e}")),
    };
    let mut head = [0u8; 9];
    stream.read_exact(&mut head).map_err(answer_err)?;
    if &head[..8] != MAGIC || head[8] > REFUSED {
        return Err(fail(format!(
            "{addr} answered, but not as a nopad rendezvous (it sent \"{}\"); is another program \
             using MASTER_PORT?",
            String::from_utf8_lossy(&head).escape_debug()
        )));
    }
    let mut read_bytes = |n: usize| -> Result<Vec<u8>, DistError> {
        let mut v = vec![0u8; n];
        stream.read_exact(&mut v).map_err(answer_err)?;
        Ok(v)
    };
    let token = match head[8] {
        ACCEPTED => {
            let b = read_bytes(8)?;
            Some(u64::from(u32_at(&b, 0)) | u64::from(u32_at(&b, 4)) << 32)
        }
        _ => None,
    };
    let len = u32_at(&read_bytes(4)?, 0) as usize;
    if len > MAX_LEN {
        return Err(fail(format!(
            "rank 0 at {addr} announced {len} bytes (at most {MAX_LEN} are expected)"
        )));
    }
    let body = read_bytes(len)?;
    match token {
        Some(token) => Ok(Meeting {
            payload: body,
            token,
        }),
        None => Err(fail(format!(
            "rank 0 ended the rendezvous: {}",
            String::from_utf8_lossy(&body)
        ))),
    }
}

/// One connection attempt to `host:port`, bounded by the deadline.
fn connect(host: &str, port: u16, deadline: Instant) -> Result<TcpStream, String> {
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {host}: {e}"))?
        .collect();
    let mut last = format!("{host} resolves to no address");
    for a in addrs {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .clamp(Duration::from_millis(10), Duration::from_secs(5));
        match TcpStream::connect_timeout(&a, left) {
            Ok(s) => return Ok(s),
            Err(e) => last = e.to_string(),
        }
    }
    Err(last)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

/// A number unlikely to repeat across runs: the clock and the process id through a randomly
/// keyed hash.
fn new_token() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    h.write_u128(now);
    h.write_u32(std::process::id());
    h.finish()
}

#[cfg(test)]
#[path = "rendezvous_tests.rs"]
mod tests;

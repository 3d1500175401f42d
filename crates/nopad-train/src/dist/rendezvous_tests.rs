//! The rendezvous on loopback, with threads as ranks.

use super::*;
use crate::dist::assert_says;

fn opts(timeout_ms: u64) -> RendezvousOptions {
    RendezvousOptions {
        timeout: Duration::from_millis(timeout_ms),
        retry: Duration::from_millis(20),
    }
}

fn payload() -> Result<Vec<u8>, DistError> {
    Ok((0..128u8).collect())
}

/// Ranks `ranks` (each with its world size) joining 127.0.0.1:`port` on threads.
fn joiners(
    port: u16,
    ranks: &[(usize, usize)],
    timeout_ms: u64,
) -> Vec<std::thread::JoinHandle<Result<Meeting, DistError>>> {
    ranks
        .iter()
        .map(|&(rank, size)| {
            std::thread::spawn(move || join("127.0.0.1", port, rank, size, &opts(timeout_ms)))
        })
        .collect()
}

fn results(
    threads: Vec<std::thread::JoinHandle<Result<Meeting, DistError>>>,
) -> Vec<Result<Meeting, DistError>> {
    threads
        .into_iter()
        .map(|t| t.join().expect("a joining thread panicked"))
        .collect()
}

fn server() -> (Server, u16) {
    let s = Server::bind("127.0.0.1", 0).unwrap();
    let port = s.listener.local_addr().unwrap().port();
    (s, port)
}

fn text(r: &Result<Meeting, DistError>) -> String {
    match r {
        Ok(m) => format!("met: {m:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn every_rank_gets_rank_0s_payload_and_token() {
    let (s, port) = server();
    let threads = joiners(port, &[(3, 4), (1, 4), (2, 4)], 10_000);
    let mine = s.serve(4, payload, &opts(10_000)).unwrap();
    assert_eq!(mine.payload, payload().unwrap());
    for r in results(threads) {
        assert_eq!(r.unwrap(), mine);
    }
}

#[test]
fn a_late_rank_0_is_waited_for() {
    // Find a free port, let the ranks knock on it first, then start rank 0 there.
    let port = server().1;
    let threads = joiners(port, &[(1, 3), (2, 3)], 10_000);
    std::thread::sleep(Duration::from_millis(300));
    let mine = Server::bind("127.0.0.1", port)
        .unwrap()
        .serve(3, payload, &opts(10_000))
        .unwrap();
    for r in results(threads) {
        assert_eq!(r.unwrap(), mine);
    }
}

/// Rank 0's error when it serves a world of `size`.
fn serve_err(s: Server, size: usize, timeout_ms: u64) -> String {
    s.serve(size, payload, &opts(timeout_ms))
        .unwrap_err()
        .to_string()
}

/// The error of rank `rank` of `size` joining 127.0.0.1:`port`.
fn join_err(port: u16, rank: usize, size: usize, timeout_ms: u64) -> String {
    let r = join("127.0.0.1", port, rank, size, &opts(timeout_ms));
    r.unwrap_err().to_string()
}

#[test]
fn a_missing_rank_times_out_naming_it_and_the_address() {
    let (s, port) = server();
    let threads = joiners(port, &[(2, 4)], 10_000);
    let e = serve_err(s, 4, 600);
    let addr = format!("127.0.0.1:{port}");
    let parts = [
        "ranks 1, 3 did not arrive",
        "arrived: 0, 2",
        RENDEZVOUS_TIMEOUT_VAR,
    ];
    assert_says(&e, &[&addr, parts[0], parts[1], parts[2]]);
    // The rank that came is told why, not left waiting.
    let told = text(&results(threads)[0]);
    assert_says(
        &told,
        &["rank 2: rank 0 ended the rendezvous", "ranks 1, 3"],
    );
}

#[test]
fn a_duplicate_rank_is_refused() {
    let (s, port) = server();
    let threads = joiners(port, &[(1, 3), (1, 3)], 10_000);
    assert_says(
        &serve_err(s, 3, 10_000),
        &["rank 1 arrived twice", "own RANK"],
    );
    for r in results(threads) {
        assert_says(&text(&r), &["arrived twice"]);
    }
}

#[test]
fn a_world_size_mismatch_is_refused() {
    let (s, port) = server();
    let threads = joiners(port, &[(1, 2)], 10_000);
    let e = serve_err(s, 3, 10_000);
    assert_says(&e, &["rank 1", "WORLD_SIZE=2", "WORLD_SIZE=3"]);
    assert_says(&text(&results(threads)[0]), &["WORLD_SIZE=2"]);
}

#[test]
fn a_rank_out_of_range_is_refused() {
    let (s, port) = server();
    let threads = joiners(port, &[(5, 3)], 10_000);
    let e = serve_err(s, 3, 10_000);
    assert_says(&e, &["says it is rank 5, not one of 1..3"]);
    assert_says(&text(&results(threads)[0]), &["rank 5"]);
}

#[test]
fn a_peer_that_is_not_a_rank_ends_the_meeting() {
    let (s, port) = server();
    let peer = std::thread::spawn(move || {
        let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        c.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        let _ = c.read_to_end(&mut Vec::new());
    });
    assert_says(&serve_err(s, 2, 10_000), &["is not a nopad rank", "GET /"]);
    peer.join().unwrap();
}

#[test]
fn a_rank_0_that_is_not_a_rendezvous_is_named() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let other = std::thread::spawn(move || {
        let (mut c, _) = listener.accept().unwrap();
        c.write_all(b"SSH-2.0-OpenSSH_9.6\r\n").unwrap();
    });
    let e = join_err(port, 1, 2, 5_000);
    assert_says(&e, &["not as a nopad rendezvous", "SSH-2.0"]);
    other.join().unwrap();
}

#[test]
fn an_unreachable_rank_0_is_named_after_the_timeout() {
    let port = server().1;
    let start = Instant::now();
    let e = join_err(port, 3, 4, 300);
    assert!(start.elapsed() < Duration::from_secs(5));
    let addr = format!("127.0.0.1:{port}");
    assert_says(&e, &["rank 3", "could not reach", &addr, "MASTER_PORT"]);
}

#[test]
fn rank_0_failing_to_make_the_payload_tells_the_others() {
    let (s, port) = server();
    let threads = joiners(port, &[(1, 2)], 10_000);
    let fails = || Err(DistError::Launch("no NCCL here".into()));
    let e = s.serve(2, fails, &opts(10_000)).unwrap_err();
    assert_eq!(e.to_string(), "no NCCL here");
    assert_says(
        &text(&results(threads)[0]),
        &["rank 0 failed: no NCCL here"],
    );
}

#[test]
fn a_world_of_one_meets_nobody() {
    let world = World {
        rank: 0,
        world_size: 1,
        local_rank: 0,
        local_world_size: 1,
        master_addr: "unresolvable.invalid".into(),
        master_port: 1,
    };
    let m = rendezvous(&world, payload, &opts(100)).unwrap();
    assert_eq!(m.payload, payload().unwrap());
}

#[test]
fn the_timeout_comes_from_the_environment() {
    let get = |k: &str| (k == RENDEZVOUS_TIMEOUT_VAR).then(|| "12.5".to_string());
    let o = RendezvousOptions::from_lookup(get).unwrap();
    assert_eq!(o.timeout, Duration::from_millis(12_500));
    let none = RendezvousOptions::from_lookup(|_| None).unwrap();
    assert_eq!(none, RendezvousOptions::default());
}

//! The rendezvous: rank 0 hands a small payload (NCCL's 128-byte unique id) to every other rank
//! over TCP on `MASTER_ADDR:MASTER_PORT`, before NCCL exists. std::net only, every wait bounded by
//! one deadline; a rank that never shows up ends rank 0's wait with an error naming it, and a rank
//! 0 that never listens ends the others' with an error naming the address.
//!
//! Wire format: a rank `r > 0` connects and sends `PEFTPIPE` + `r` + `world_size` (u32 little
//! endian each); rank 0 checks them (rank in range, not seen twice, same world size), and once all
//! `W - 1` have arrived sends each `len` (u32 LE) + the payload.

use super::CommError;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

const MAGIC: &[u8; 8] = b"PEFTPIPE";
const POLL: Duration = Duration::from_millis(20);

fn error(message: String) -> CommError {
    CommError::Rendezvous(message)
}

/// Rank 0: listen on `port` (all interfaces), wait for the other `world_size - 1` ranks, send
/// them `payload`.
pub fn serve(
    port: u16,
    world_size: usize,
    payload: &[u8],
    timeout: Duration,
) -> Result<(), CommError> {
    let listener = TcpListener::bind(("0.0.0.0", port)).map_err(|e| {
        error(format!(
            "rank 0 cannot listen on port {port}: {e} (MASTER_PORT in use?)"
        ))
    })?;
    serve_on(listener, world_size, payload, timeout)
}

/// [`serve`] on a listener already bound (tests bind port 0).
pub fn serve_on(
    listener: TcpListener,
    world_size: usize,
    payload: &[u8],
    timeout: Duration,
) -> Result<(), CommError> {
    let deadline = Instant::now() + timeout;
    listener
        .set_nonblocking(true)
        .map_err(|e| error(format!("rank 0: {e}")))?;
    let mut peers: Vec<Option<TcpStream>> = (0..world_size).map(|_| None).collect();
    let mut arrived = 1;
    while arrived < world_size {
        match listener.accept() {
            Ok((mut stream, from)) => {
                stream
                    .set_nonblocking(false)
                    .and_then(|()| stream.set_read_timeout(Some(remaining(deadline)?)))
                    .map_err(|e| error(format!("rank 0: connection from {from}: {e}")))?;
                let mut hello = [0u8; 16];
                if stream.read_exact(&mut hello).is_err() || &hello[..8] != MAGIC {
                    // Not one of ours (a port scanner, a stale client): ignore it.
                    continue;
                }
                let rank = u32::from_le_bytes([hello[8], hello[9], hello[10], hello[11]]) as usize;
                let theirs =
                    u32::from_le_bytes([hello[12], hello[13], hello[14], hello[15]]) as usize;
                if theirs != world_size {
                    return Err(error(format!(
                        "rank {rank} (from {from}) has WORLD_SIZE={theirs}, rank 0 has {world_size}"
                    )));
                }
                if rank == 0 || rank >= world_size {
                    return Err(error(format!(
                        "a process at {from} claims rank {rank} of {world_size}"
                    )));
                }
                if peers[rank].is_some() {
                    return Err(error(format!(
                        "two processes claim rank {rank} (the second from {from})"
                    )));
                }
                peers[rank] = Some(stream);
                arrived += 1;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let missing: Vec<usize> =
                        (1..world_size).filter(|&r| peers[r].is_none()).collect();
                    return Err(error(format!(
                        "rank 0 waited {:.0} s for rank(s) {missing:?} to connect (did they start, \
                         with the same MASTER_ADDR/MASTER_PORT?)",
                        timeout.as_secs_f64()
                    )));
                }
                std::thread::sleep(POLL);
            }
            Err(e) => return Err(error(format!("rank 0: accept: {e}"))),
        }
    }
    let length = (payload.len() as u32).to_le_bytes();
    for (rank, stream) in peers.iter_mut().enumerate() {
        if let Some(stream) = stream {
            stream
                .write_all(&length)
                .and_then(|()| stream.write_all(payload))
                .map_err(|e| error(format!("rank 0: sending to rank {rank}: {e}")))?;
        }
    }
    Ok(())
}

/// Rank `rank > 0`: connect to rank 0 at `address:port` (retrying until rank 0 listens), announce
/// ourselves, and receive the payload.
pub fn join(
    address: &str,
    port: u16,
    rank: usize,
    world_size: usize,
    timeout: Duration,
) -> Result<Vec<u8>, CommError> {
    let deadline = Instant::now() + timeout;
    let target = format!("{address}:{port}");
    loop {
        let stream = connect(&target, rank, deadline, timeout)?;
        match exchange(stream, rank, world_size, deadline) {
            Ok(payload) => return Ok(payload),
            // Accepted into the backlog of a listener that was closing (rank 0's previous
            // rendezvous on this port, just finished): that one never answers; try again.
            Err(e) if closed_early(&e) && Instant::now() < deadline => std::thread::sleep(POLL),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(error(format!(
                    "rank {rank}: rank 0 at {target} sent nothing within {:.0} s (another rank \
                     missing?)",
                    timeout.as_secs_f64()
                )))
            }
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                return Err(error(format!("rank {rank}: rank 0 at {target}: {e}")))
            }
            Err(e) => {
                return Err(error(format!(
                    "rank {rank}: exchange with rank 0 at {target}: {e}"
                )))
            }
        }
    }
}

/// A connection to rank 0 at `target`, retried until `deadline` while nobody listens.
fn connect(
    target: &str,
    rank: usize,
    deadline: Instant,
    timeout: Duration,
) -> Result<TcpStream, CommError> {
    let mut last_error = String::from("no attempt");
    loop {
        let addresses: Vec<SocketAddr> = match target.to_socket_addrs() {
            Ok(a) => a.collect(),
            Err(e) => {
                return Err(error(format!(
                    "rank {rank}: MASTER_ADDR:MASTER_PORT = {target} does not resolve: {e}"
                )))
            }
        };
        let attempt = addresses.iter().find_map(|a| {
            match TcpStream::connect_timeout(a, POLL.max(Duration::from_millis(200))) {
                Ok(s) => Some(s),
                Err(e) => {
                    last_error = e.to_string();
                    None
                }
            }
        });
        if let Some(stream) = attempt {
            return Ok(stream);
        }
        if Instant::now() >= deadline {
            return Err(error(format!(
                "rank {rank}: rank 0 did not accept at {target} within {:.0} s (last error: \
                 {last_error}); is rank 0 running with this MASTER_ADDR/MASTER_PORT?",
                timeout.as_secs_f64()
            )));
        }
        std::thread::sleep(POLL);
    }
}

/// Announce this rank on `stream` and read rank 0's payload.
fn exchange(
    mut stream: TcpStream,
    rank: usize,
    world_size: usize,
    deadline: Instant,
) -> std::io::Result<Vec<u8>> {
    let mut hello = Vec::with_capacity(16);
    hello.extend_from_slice(MAGIC);
    hello.extend_from_slice(&(rank as u32).to_le_bytes());
    hello.extend_from_slice(&(world_size as u32).to_le_bytes());
    stream.write_all(&hello)?;
    stream.set_read_timeout(Some(remaining(deadline)?))?;
    let mut length = [0u8; 4];
    stream.read_exact(&mut length)?;
    let length = u32::from_le_bytes(length) as usize;
    if length > 1 << 20 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("announced a {length}-byte payload (not a peftpipe rendezvous?)"),
        ));
    }
    let mut payload = vec![0u8; length];
    stream.read_exact(&mut payload)?;
    Ok(payload)
}

/// Whether rank 0's side closed the connection before answering (reset, end of stream, broken
/// pipe) rather than being slow.
fn closed_early(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::UnexpectedEof
            | std::io::ErrorKind::BrokenPipe
    )
}

/// Time left until `deadline` (an error when none: a zero read timeout means "none" to std).
fn remaining(deadline: Instant) -> std::io::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "deadline passed",
        ))
    } else {
        Ok(left)
    }
}

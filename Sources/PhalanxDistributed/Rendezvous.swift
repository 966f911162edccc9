import Foundation
import Glibc

/// Hands a small payload (NCCL's 128-byte unique id) from rank 0 to every other rank over TCP,
/// before NCCL exists: rank 0 listens on `MASTER_PORT` (all IPv4 interfaces), every other rank
/// connects to `MASTER_ADDR:MASTER_PORT`, retrying every 100 ms until rank 0 listens.
///
/// Messages (integers big-endian):
///
///     rank r -> rank 0:   "PHLX"  rank r (UInt32)  world size (UInt32)
///     rank 0 -> rank r:   payload length n (UInt32)  n bytes
///
/// Rank 0 answers nobody until all `worldSize - 1` ranks have arrived, so a rank that returns knows
/// every rank reached the rendezvous. Everything is bounded by `timeout` seconds: rank 0 fails
/// naming the ranks that did not arrive; another rank fails naming rank 0's address when it cannot
/// connect or is not answered (rank 0 closes every connection when it gives up).
public enum Rendezvous {
    private static let magic: [UInt8] = Array("PHLX".utf8)

    /// Rank 0's `payload` on every rank: rank 0 (which must pass it) serves it, the others fetch
    /// it. A single rank returns `payload` at once.
    ///
    /// - Throws: `RendezvousError` as the type's summary describes.
    public static func share(_ payload: [UInt8]?, launch: LaunchEnvironment, timeout: Double) throws -> [UInt8] {
        if launch.rank == 0 {
            guard let payload else { throw RendezvousError("rank 0 has no payload to hand out") }
            if launch.worldSize > 1 { try serve(payload, port: launch.masterPort, worldSize: launch.worldSize, timeout: timeout) }
            return payload
        }
        return try fetch(host: launch.masterAddress ?? "", port: launch.masterPort, rank: launch.rank,
                         worldSize: launch.worldSize, timeout: timeout)
    }

    /// Rank 0's side: listens on `port`, waits for ranks `1 ..< worldSize`, then sends each `payload`.
    public static func serve(_ payload: [UInt8], port: Int, worldSize: Int, timeout: Double) throws {
        let deadline = Deadline(seconds: timeout)
        let listener = try Socket.listening(port: port)
        defer { listener.close() }
        var peers: [Int: Socket] = [:]
        defer { for peer in peers.values { peer.close() } }
        while peers.count < worldSize - 1 {
            guard let peer = try listener.accept(before: deadline) else {
                let missing = (1..<worldSize).filter { peers[$0] == nil }
                throw RendezvousError("rank 0 at port \(port): after \(timeout) s, rank\(missing.count == 1 ? "" : "s") "
                                      + "\(missing.map(String.init).joined(separator: ", ")) of \(worldSize) did not arrive")
            }
            // A connection that is not a rank (a port scan, a stale client) is dropped, not fatal.
            guard let hello = try? peer.receive(12, before: deadline), Array(hello[0..<4]) == magic else {
                peer.close()
                continue
            }
            let rank = Int(UInt32(bigEndianBytes: hello[4..<8])), size = Int(UInt32(bigEndianBytes: hello[8..<12]))
            guard size == worldSize else {
                peer.close()
                throw RendezvousError("rank \(rank) says the world has \(size) ranks, rank 0 says \(worldSize): the launch variables disagree")
            }
            guard (1..<worldSize).contains(rank), peers[rank] == nil else {
                peer.close()
                throw RendezvousError("rank 0 at port \(port): a peer claims rank \(rank), "
                                      + (peers[rank] == nil ? "which is not in 1 ..< \(worldSize)" : "which already arrived"))
            }
            peers[rank] = peer
        }
        let message = UInt32(payload.count).bigEndianBytes + payload
        for (rank, peer) in peers.sorted(by: { $0.key < $1.key }) {
            do { try peer.send(message) } catch { throw RendezvousError("rank 0: sending to rank \(rank) failed: \(error)") }
        }
    }

    /// Another rank's side: connects to rank 0 at `host:port`, says who it is, returns the payload.
    public static func fetch(host: String, port: Int, rank: Int, worldSize: Int, timeout: Double) throws -> [UInt8] {
        let deadline = Deadline(seconds: timeout)
        let connection = try Socket.connecting(host: host, port: port, before: deadline, who: "rank \(rank)")
        defer { connection.close() }
        let peer = "rank \(rank): rank 0 at \(host):\(port)"
        do {
            try connection.send(magic + UInt32(rank).bigEndianBytes + UInt32(worldSize).bigEndianBytes)
            let length = Int(UInt32(bigEndianBytes: try connection.receive(4, before: deadline)[...]))
            return try connection.receive(length, before: deadline)
        } catch let error as RendezvousError {
            throw RendezvousError("\(peer) did not hand out the id (it gives up when a rank does not arrive within its timeout): \(error.message)")
        }
    }
}

/// The rendezvous failed; the message names the rank that is missing or the address not reached.
public struct RendezvousError: Error, CustomStringConvertible {
    /// What failed.
    public let message: String
    init(_ message: String) { self.message = message }
    /// The message.
    public var description: String { message }
}

/// A point in time on the monotonic clock, `seconds` from now.
struct Deadline {
    private let end: UInt64

    init(seconds: Double) { end = DispatchTime.now().uptimeNanoseconds + UInt64(max(0, seconds) * 1e9) }

    /// Milliseconds left (0 when passed), for `poll`.
    var millisecondsLeft: Int32 {
        let now = DispatchTime.now().uptimeNanoseconds
        return now >= end ? 0 : Int32(min((end - now) / 1_000_000 + 1, UInt64(Int32.max)))
    }

    var hasPassed: Bool { DispatchTime.now().uptimeNanoseconds >= end }
}

extension UInt32 {
    var bigEndianBytes: [UInt8] { [UInt8(self >> 24), UInt8(self >> 16 & 0xFF), UInt8(self >> 8 & 0xFF), UInt8(self & 0xFF)] }

    init(bigEndianBytes bytes: ArraySlice<UInt8>) {
        self = bytes.reduce(0) { $0 << 8 | UInt32($1) }
    }
}

import Foundation
import PhalanxDistributed
import Testing

/// Rendezvous over TCP on 127.0.0.1, ranks as threads of this process.
@Suite("Rendezvous: rank 0 hands its id to every rank over TCP", .serialized)
struct RendezvousTests {
    /// Runs `body(rank)` for every rank on its own thread; returns each rank's result.
    private func onThreads<T: Sendable>(_ count: Int, _ body: @escaping @Sendable (Int) -> T) -> [T] {
        let results = Results<T>(count)
        let group = DispatchGroup()
        for rank in 0..<count {
            group.enter()
            Thread {
                results.set(rank, body(rank))
                group.leave()
            }.start()
        }
        group.wait()
        return results.values
    }

    private func launch(_ rank: Int, _ worldSize: Int, port: Int) throws -> LaunchEnvironment {
        try LaunchEnvironment.detect(["RANK": "\(rank)", "WORLD_SIZE": "\(worldSize)", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "\(port)"])
    }

    @Test("four ranks receive rank 0's 128 bytes, whoever starts first")
    func fourRanks() throws {
        let port = try WorkerLaunch.freePort()
        let id = (0..<128).map { UInt8(truncatingIfNeeded: $0 * 37 + 11) }
        let received = onThreads(4) { rank -> Result<[UInt8], ErrorText> in
            // Ranks 1-3 start before rank 0 listens: they must retry.
            if rank == 0 { usleep(300_000) }
            do {
                return .success(try Rendezvous.share(rank == 0 ? id : nil, launch: self.launch(rank, 4, port: port), timeout: 10))
            } catch { return .failure(ErrorText("\(error)")) }
        }
        for result in received { #expect((try? result.get()) == id) }
    }

    @Test("a rank that never arrives: rank 0 fails within its timeout naming it, and the waiting ranks fail too")
    func missingRank() throws {
        let port = try WorkerLaunch.freePort()
        let started = Date()
        let results = onThreads(3) { rank -> String in
            do {
                _ = try Rendezvous.share(rank == 0 ? [1, 2, 3] : nil, launch: self.launch(rank, 4, port: port), timeout: 1.5)
                return "returned"
            } catch { return "\(error)" }
        }
        #expect(Date().timeIntervalSince(started) < 6)
        #expect(results[0].contains("rank 3 of 4 did not arrive"))
        #expect(results[1].contains("rank 1: rank 0 at 127.0.0.1:\(port) did not hand out the id"))
        #expect(results[2].contains("rank 2:"))
    }

    @Test("no rank 0: another rank fails naming the address it could not reach")
    func noRankZero() throws {
        let port = try WorkerLaunch.freePort()
        #expect {
            try Rendezvous.fetch(host: "127.0.0.1", port: port, rank: 1, worldSize: 2, timeout: 0.5)
        } throws: { "\($0)".contains("rank 1 could not reach rank 0 at 127.0.0.1:\(port)") }
    }

    @Test("ranks that disagree on the world size are an error naming both counts")
    func worldSizeMismatch() throws {
        let port = try WorkerLaunch.freePort()
        let results = onThreads(2) { rank -> String in
            do {
                if rank == 0 { try Rendezvous.serve([9], port: port, worldSize: 2, timeout: 5) }
                else { _ = try Rendezvous.fetch(host: "127.0.0.1", port: port, rank: 1, worldSize: 3, timeout: 5) }
                return "returned"
            } catch { return "\(error)" }
        }
        #expect(results[0].contains("rank 1 says the world has 3 ranks, rank 0 says 2"))
        #expect(results[1] != "returned")
    }

    @Test("one rank needs no network")
    func single() throws {
        let launch = try LaunchEnvironment.detect([:])
        #expect(try Rendezvous.share([4, 2], launch: launch, timeout: 0) == [4, 2])
    }
}

/// Per-rank results written from several threads.
final class Results<T: Sendable>: @unchecked Sendable {
    private let lock = NSLock()
    private var slots: [T?]
    init(_ count: Int) { slots = Array(repeating: nil, count: count) }
    func set(_ index: Int, _ value: T) { lock.withLock { slots[index] = value } }
    var values: [T] { lock.withLock { slots.map { $0! } } }
}

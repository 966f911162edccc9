import CNCCL
import CNCCLTestDouble
import Foundation
import PhalanxCUDA
import PhalanxDistributed
import PhalanxLayers
import PhalanxRuntime
import Testing

@Suite("In-process communicator (the stand-in for NCCL)")
struct LocalCommunicatorTests {
    /// Runs `body(communicator)` for every rank of `group` on its own thread.
    private func onRanks<T: Sendable>(_ group: LocalCommunicatorGroup, _ body: @escaping @Sendable (LocalCommunicator) throws -> T) -> [Result<T, ErrorText>] {
        let results = Results<Result<T, ErrorText>>(group.worldSize)
        let done = DispatchGroup()
        for rank in 0..<group.worldSize {
            done.enter()
            Thread {
                do { results.set(rank, .success(try body(group.communicator(rank: rank)))) }
                catch { results.set(rank, .failure(ErrorText("\(error)"))) }
                done.leave()
            }.start()
        }
        done.wait()
        return results.values
    }

    /// Rank `r`'s gradient values for tensor `i` of `count` elements: seeded, distinct per rank.
    static func values(rank: Int, tensor: Int, count: Int) -> [Float] {
        var rng = SeededGenerator(seed: UInt64(1000 * rank + tensor))
        return (0..<count).map { _ in Float.random(in: -3...3, using: &rng) }
    }

    @Test("allReduceAverage: every rank gets the same bits, the float32 sum of x_r / W in rank order, near the Double mean",
          arguments: [1, 2, 3, 4])
    func average(worldSize: Int) throws {
        let sizes = [1, 7, 64, 1000]
        let group = LocalCommunicatorGroup(worldSize: worldSize, timeout: 10)
        let results = onRanks(group) { communicator -> [[Float]] in
            let bucket = sizes.enumerated().map { Tensor(Self.values(rank: communicator.rank, tensor: $0, count: $1), shape: [$1]) }
            // Two rounds: the group's slots are reused correctly.
            try communicator.allReduceAverage(bucket)
            try communicator.allReduceAverage(bucket)
            try communicator.finishReductions()
            return bucket.map(\.array)
        }
        let reduced = try results.map { try $0.get() }
        #expect(reduced.allSatisfy { $0 == reduced[0] })
        let scale = 1 / Float(worldSize)
        for (i, count) in sizes.enumerated() {
            var once = [Float](repeating: 0, count: count)
            for r in 0..<worldSize { for j in 0..<count { once[j] += Self.values(rank: r, tensor: i, count: count)[j] * scale } }
            // The second round averages equal inputs: x * s summed W times.
            var twice = [Float](repeating: 0, count: count)
            for _ in 0..<worldSize { for j in 0..<count { twice[j] += once[j] * scale } }
            #expect(reduced[0][i] == twice)
            for j in 0..<count {
                let mean = (0..<worldSize).map { Double(Self.values(rank: $0, tensor: i, count: count)[j]) }.reduce(0, +) / Double(worldSize)
                #expect(abs(Double(once[j]) - mean) <= 1e-6 * 3 * Double(worldSize))
            }
        }
    }

    @Test("broadcast of tensors and bytes gives rank 0's; barrier returns on every rank")
    func broadcast() throws {
        let group = LocalCommunicatorGroup(worldSize: 3, timeout: 10)
        let results = onRanks(group) { communicator -> ([Float], [UInt8]) in
            let weights = Tensor([Float(communicator.rank), 1, 2], shape: [3])
            try communicator.broadcast([weights])
            let bytes = try communicator.broadcast(communicator.rank == 0 ? [7, 8, 9] : [1])
            try communicator.barrier()
            try communicator.requireSameOnEveryRank("plan-A", what: "bucket plan")
            return (weights.array, bytes)
        }
        for result in results {
            let (weights, bytes) = try result.get()
            #expect(weights == [0, 1, 2] && bytes == [7, 8, 9])
        }
    }

    @Test("a rank with a different plan signature is told so")
    func signatureMismatch() throws {
        let group = LocalCommunicatorGroup(worldSize: 2, timeout: 10)
        let results = onRanks(group) { communicator in
            try communicator.requireSameOnEveryRank(communicator.rank == 0 ? "a:4" : "a:8", what: "bucket plan")
        }
        #expect((try? results[0].get()) != nil)
        #expect(throws: ErrorText.self) { try results[1].get() }
        if case .failure(let error) = results[1] { #expect(error.text.contains("rank 1: its bucket plan (a:8) differs from rank 0's (a:4)")) }
    }

    @Test("a rank that does not arrive: the others fail within the timeout naming it, and later calls fail at once")
    func stalledRank() throws {
        let group = LocalCommunicatorGroup(worldSize: 3, timeout: 0.5)
        let started = Date()
        let results = onRanks(group) { communicator -> Bool in
            guard communicator.rank != 2 else { return false }  // Rank 2 "died" before the collective.
            try communicator.allReduceAverage([Tensor([1], shape: [1])])
            return true
        }
        #expect(Date().timeIntervalSince(started) < 5)
        for rank in 0..<2 {
            guard case .failure(let error) = results[rank] else { Issue.record("rank \(rank) returned"); continue }
            #expect(error.text.contains("rank 2 did not arrive"))
        }
        #expect(throws: CommunicatorError.self) { try group.communicator(rank: 0).checkHealth() }
        #expect(throws: CommunicatorError.self) { try group.communicator(rank: 1).barrier() }
    }

    @Test("a failed rank (fail) wakes the others with the reason")
    func failure() throws {
        let group = LocalCommunicatorGroup(worldSize: 2, timeout: 30)
        let started = Date()
        let results = onRanks(group) { communicator -> Bool in
            if communicator.rank == 1 {
                usleep(100_000)
                group.fail("rank 1: out of memory")
                return false
            }
            try communicator.barrier()
            return true
        }
        #expect(Date().timeIntervalSince(started) < 5)
        if case .failure(let error) = results[0] { #expect(error.text == "rank 1: out of memory") } else { Issue.record("rank 0 returned") }
    }
}

@Suite("NCCL: loading (no GPU needed) and a collective on the GPUs")
struct NCCLTests {
    @Test("candidates: PHALANX_NCCL first, then the loader, CUDA's folders, then Python wheels (venv, user, system)")
    func candidates() {
        let folders = ["/venv/lib": ["python3.12", "site.py"], "/home/u/.local/lib": ["python3.11"],
                       "/usr/local/lib": ["python3.10", "python3.12"], "/usr/lib": ["python3"]]
        let list = NCCL.defaultCandidates(environment: ["PHALANX_NCCL": "/opt/nccl/libnccl.so.2", "VIRTUAL_ENV": "/venv",
                                                        "HOME": "/home/u"],
                                          listDirectory: { folders[$0] ?? [] })
        let wheel = "nvidia/nccl/lib/libnccl.so.2"
        #expect(list == [
            "/opt/nccl/libnccl.so.2", "libnccl.so.2",
            "/usr/local/cuda/targets/x86_64-linux/lib/libnccl.so.2", "/usr/local/cuda/lib64/libnccl.so.2",
            "/usr/lib/x86_64-linux-gnu/libnccl.so.2",
            "/venv/lib/python3.12/site-packages/\(wheel)", "/venv/lib/python3.12/dist-packages/\(wheel)",
            "/home/u/.local/lib/python3.11/site-packages/\(wheel)", "/home/u/.local/lib/python3.11/dist-packages/\(wheel)",
            "/usr/local/lib/python3.12/site-packages/\(wheel)", "/usr/local/lib/python3.12/dist-packages/\(wheel)",
            "/usr/local/lib/python3.10/site-packages/\(wheel)", "/usr/local/lib/python3.10/dist-packages/\(wheel)",
            "/usr/lib/python3/site-packages/\(wheel)", "/usr/lib/python3/dist-packages/\(wheel)",
        ])
    }

    @Test("ncclCommInitRank's 128-byte id passes by value through the CNCCL function type")
    func uniqueIdByValue() {
        let initRank: ncclCommInitRank_fn = test_double_comm_init_rank
        var id = ncclUniqueId()
        let bytes = (0..<128).map { UInt8(truncatingIfNeeded: $0 &* 53 &+ 7) }
        withUnsafeMutableBytes(of: &id) { $0.copyBytes(from: bytes) }
        var comm: ncclComm_t?
        #expect(initRank(&comm, 4, id, 3) == 0)
        var received = [UInt8](repeating: 0, count: 128)
        var ranks: Int32 = 0, rank: Int32 = 0
        test_double_last_call(&received, &ranks, &rank)
        #expect(received == bytes && ranks == 4 && rank == 3)
    }

    @Test("a missing NCCL is CUDAUnavailable naming every place tried; NCCL_NVLS_ENABLE is set to 0 when unset")
    func missing() {
        #expect {
            _ = try NCCL(candidates: ["/nonexistent/libnccl.so.2", "libnccl-missing.so.9"])
        } throws: { error in
            guard let error = error as? CUDAUnavailable else { return false }
            return error.reason.contains("/nonexistent/libnccl.so.2") && error.reason.contains("libnccl-missing.so.9")
                && error.reason.contains("PHALANX_NCCL")
        }
        // Set before the library was opened (to 0, unless this test run set it itself).
        #expect(getenv("NCCL_NVLS_ENABLE") != nil)
    }

    @Test("NCCL is found here, or the shared loader says why",
          .enabled(if: NCCL.unavailableReason == nil, Comment(rawValue: "NCCL not found: \(NCCL.unavailableReason ?? "")")))
    func loads() throws {
        let nccl = try NCCL.shared.get()
        #expect(nccl.version >= 21000)
        #expect(try nccl.uniqueId().count == 128)
    }

    @Test("one-rank NCCL communicator: average, broadcast and barrier on the GPU",
          .enabled(if: NCCL.unavailableReason == nil && CUDADevice.shared.isSuccess,
                   Comment(rawValue: "needs NCCL and a CUDA device: \(NCCL.unavailableReason ?? CUDAContext.unavailableReason ?? "")")))
    func oneRank() throws {
        let device = try CUDADevice.shared.get()
        let communicator = try NCCLCommunicator(launch: try LaunchEnvironment.detect([:]), device: device, timeout: 30)
        let gradient = Tensor([1, -2, 3.5], shape: [3], on: .cuda(device))
        try communicator.allReduceAverage([gradient])
        try communicator.finishReductions()
        #expect(gradient.array == [1, -2, 3.5])
        #expect(try communicator.broadcast([5, 6]) == [5, 6])
        try communicator.barrier()
        try communicator.checkHealth()
    }
}

extension Result {
    var isSuccess: Bool { if case .success = self { true } else { false } }
}

/// An error's text, as a `Sendable` `Error` for `Result`.
struct ErrorText: Error, Sendable {
    let text: String
    init(_ text: String) { self.text = text }
}

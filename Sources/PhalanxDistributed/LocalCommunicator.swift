import Foundation
import PhalanxLayers
import PhalanxRuntime

/// An in-process stand-in for NCCL: `worldSize` ranks as threads of one process, each holding a
/// `LocalCommunicator` of one shared `LocalCommunicatorGroup`. For tests and CPU-only checks of
/// the data-parallel logic.
///
/// Every collective is a rendezvous: each rank deposits its contribution, waits until all ranks
/// have (or `timeout` passes: then it throws naming the ranks that did not arrive, and the group
/// is failed for every rank), and computes the result itself from the contributions in rank order
/// `0, 1, ..., W-1`, so every rank gets the same bits. Averages are float32, as NCCL's `ncclAvg`:
///
///     g = fl(... fl(fl(g^(0) * s) + fl(g^(1) * s)) + ... + fl(g^(W-1) * s)),    s = fl(1 / W)
///
/// (NCCL's ring starts each chunk's sum at a different rank, so its low bits can differ from this
/// fixed order; equal on every rank is what both guarantee.)
public final class LocalCommunicatorGroup: @unchecked Sendable {
    /// The number of ranks.
    public let worldSize: Int
    /// Seconds a rank waits for the others at a collective.
    public let timeout: Double
    private let condition = NSCondition()
    private var contributions: [[[Float]]?]
    private var bytes: [UInt8] = []
    private var arrived = 0
    private var departed = 0
    private var generation = 0
    private var failure: CommunicatorError?

    /// A group of `worldSize` ranks whose collectives give up after `timeout` seconds.
    public init(worldSize: Int, timeout: Double = 60) {
        require(worldSize >= 1, "LocalCommunicatorGroup: worldSize must be at least 1, got \(worldSize)")
        self.worldSize = worldSize
        self.timeout = timeout
        contributions = Array(repeating: nil, count: worldSize)
    }

    /// Rank `rank`'s communicator.
    public func communicator(rank: Int) -> LocalCommunicator {
        require((0..<worldSize).contains(rank), "LocalCommunicatorGroup: rank \(rank) is not in 0 ..< \(worldSize)")
        return LocalCommunicator(group: self, rank: rank)
    }

    /// Marks the group failed, as a crashed rank would leave NCCL: every waiting and later collective throws `reason`.
    public func fail(_ reason: String) {
        condition.lock()
        if failure == nil { failure = CommunicatorError(reason) }
        condition.broadcast()
        condition.unlock()
    }

    func checkHealth() throws {
        condition.lock()
        defer { condition.unlock() }
        if let failure { throw failure }
    }

    /// Deposits `values` (and `bytes` from rank 0) as `rank`'s contribution, waits for every rank,
    /// and returns what `combine` computes from all contributions (in rank order) and rank 0's bytes.
    func exchange<Result>(rank: Int, _ values: [[Float]], bytes: [UInt8] = [], what: String, timeout: Double? = nil,
                          _ combine: ([[[Float]]], [UInt8]) -> Result) throws -> Result {
        condition.lock()
        defer { condition.unlock() }
        let timeout = timeout ?? self.timeout
        let deadline = Date(timeIntervalSinceNow: timeout)
        // Wait for the previous collective's ranks to leave before reusing the slots.
        while departed > 0 && failure == nil {
            guard condition.wait(until: deadline) else { return try timedOut(rank: rank, what: what, after: timeout) }
        }
        if let failure { throw failure }
        let myGeneration = generation
        contributions[rank] = values
        if rank == 0 { self.bytes = bytes }
        arrived += 1
        if arrived == worldSize {
            arrived = 0
            departed = worldSize
            generation += 1
            condition.broadcast()
        }
        while generation == myGeneration && failure == nil {
            guard condition.wait(until: deadline) else { return try timedOut(rank: rank, what: what, after: timeout) }
        }
        if let failure { throw failure }
        let result = combine(contributions.map { $0! }, self.bytes)
        departed -= 1
        if departed == 0 {
            contributions = Array(repeating: nil, count: worldSize)
            condition.broadcast()
        }
        return result
    }

    /// Fails the group naming the ranks that have not deposited at this collective (lock held).
    private func timedOut<Result>(rank: Int, what: String, after timeout: Double) throws -> Result {
        let missing = contributions.indices.filter { contributions[$0] == nil }
        let who = missing.isEmpty ? "\(departed) rank(s) did not leave the previous collective"
            : "rank\(missing.count == 1 ? "" : "s") \(missing.map(String.init).joined(separator: ", ")) did not arrive"
        let error = CommunicatorError("rank \(rank): \(what) not finished after \(timeout) s; \(who)")
        if failure == nil { failure = error }
        condition.broadcast()
        throw failure!
    }
}

/// One rank of a `LocalCommunicatorGroup`; tensors may live on the CPU or a GPU (read with
/// `array`, written with `write`).
public final class LocalCommunicator: Communicator, @unchecked Sendable {
    /// The group.
    public let group: LocalCommunicatorGroup
    /// This rank.
    public let rank: Int
    /// The group's size.
    public var worldSize: Int { group.worldSize }

    init(group: LocalCommunicatorGroup, rank: Int) {
        self.group = group
        self.rank = rank
    }

    /// See `Communicator.allReduceAverage` and the group's summary for the order of the sum.
    public func allReduceAverage(_ bucket: [Tensor]) throws {
        let scale = 1 / Float(worldSize)
        let means = try group.exchange(rank: rank, bucket.map(\.array), what: "allReduceAverage(\(bucket.count) tensors)") { all, _ in
            bucket.indices.map { i in
                var sum = [Float](repeating: 0, count: bucket[i].count)
                for contribution in all {
                    require(contribution[i].count == sum.count,
                            "LocalCommunicator.allReduceAverage: tensor \(i) has \(sum.count) elements here, \(contribution[i].count) on another rank")
                    for j in sum.indices { sum[j] += contribution[i][j] * scale }
                }
                return sum
            }
        }
        for (tensor, mean) in zip(bucket, means) { tensor.write(mean) }
    }

    /// Nothing to wait for: `allReduceAverage` returns with the means in place.
    public func finishReductions() throws { try group.checkHealth() }

    /// Rank 0's values in every tensor.
    public func broadcast(_ tensors: [Tensor]) throws {
        let values = try group.exchange(rank: rank, tensors.map(\.array), what: "broadcast(\(tensors.count) tensors)") { all, _ in all[0] }
        for (tensor, value) in zip(tensors, values) {
            require(value.count == tensor.count, "LocalCommunicator.broadcast: rank 0's tensor has \(value.count) elements, this rank's \(tensor.count)")
            tensor.write(value)
        }
    }

    /// Rank 0's bytes.
    public func broadcast(_ bytes: [UInt8]) throws -> [UInt8] {
        try group.exchange(rank: rank, [], bytes: bytes, what: "broadcast(bytes)") { _, rootBytes in rootBytes }
    }

    /// Every rank meets.
    public func barrier(timeout: Double?) throws {
        try group.exchange(rank: rank, [], what: "barrier", timeout: timeout) { _, _ in () }
    }

    /// Throws the group's failure, if any.
    public func checkHealth() throws { try group.checkHealth() }
}

import PhalanxLayers

/// The collectives a data-parallel trainer needs, across `worldSize` ranks (one per GPU). The
/// trainer owns one and passes gradient buckets to it; the model never names it.
///
/// Contract: every rank calls the same methods in the same order with tensors of the same shapes
/// (the `GradientBucketPlan` fixes that order), and every rank receives the same bits. A rank that
/// died or stalls makes the others throw within a bounded time (`timeout`), naming a rank where
/// the implementation can tell; after that the communicator is unusable.
public protocol Communicator: AnyObject, Sendable {
    /// This process's rank, `0 ..< worldSize`.
    var rank: Int { get }
    /// The number of ranks.
    var worldSize: Int { get }

    /// Starts replacing each float32 tensor of one bucket by its mean over ranks, in place:
    ///
    ///     g_i <- sum over r of (g_i^(r) / W),    W = worldSize
    ///
    /// (NCCL's `ncclAvg` on floats: each rank's input scaled by `1/W`, then summed). The reduction
    /// sees all work queued before the call and may run while later work is queued (a GPU
    /// communicator overlaps it with the rest of the backward pass); the tensors hold the means
    /// once `finishReductions` has returned, and must not be written before.
    func allReduceAverage(_ bucket: [Tensor]) throws

    /// Returns when every reduction started by `allReduceAverage` has finished (or throws when one
    /// failed or timed out, naming the rank).
    func finishReductions() throws

    /// Overwrites each tensor on every rank with rank 0's (parameters at the start, so every rank
    /// starts from the same weights).
    func broadcast(_ tensors: [Tensor]) throws

    /// Rank 0's `bytes` on every rank (other ranks' argument is ignored): a configuration, a
    /// checkpoint header, a plan's signature.
    func broadcast(_ bytes: [UInt8]) throws -> [UInt8]

    /// Returns when every rank has called it, waiting at most `timeout` seconds (nil: the
    /// communicator's own timeout) for the last one, for instance while rank 0 writes a checkpoint.
    func barrier(timeout: Double?) throws

    /// Throws when a collective failed or a peer is known to have failed, without waiting.
    func checkHealth() throws
}

extension Communicator {
    /// A barrier within the communicator's own timeout.
    public func barrier() throws { try barrier(timeout: nil) }

    /// Stops with a message naming this rank unless every rank has the same `signature` (a
    /// bucket plan's, a configuration's): a mismatch would otherwise reduce unrelated numbers.
    public func requireSameOnEveryRank(_ signature: String, what: String) throws {
        let reference = String(decoding: try broadcast(Array(signature.utf8)), as: UTF8.self)
        guard reference == signature else {
            throw CommunicatorError("rank \(rank): its \(what) (\(signature)) differs from rank 0's (\(reference))")
        }
    }
}

/// A collective failed, timed out, or the ranks disagree; the message names the rank(s).
public struct CommunicatorError: Error, CustomStringConvertible, Equatable {
    /// What failed, naming ranks.
    public let message: String
    init(_ message: String) { self.message = message }
    /// The message.
    public var description: String { message }
}

import Foundation
import PhalanxData
import PhalanxDistributed
import PhalanxLayers
import PhalanxRuntime

/// What a trainer needs to train as one rank of a data-parallel run: the communicator, this
/// rank's share of every batch, and the gradient buckets.
///
/// Each rank holds the whole model and trains on rows `r * B/W ..< (r + 1) * B/W` of every global
/// batch (`BatchShard`); after backward, each gradient is replaced by its mean over the ranks, so
/// every rank takes the same AdamW step from the same numbers and the weights stay identical. The
/// mean over ranks of the per-rank mean losses is the loss of the global batch, as in one process.
///
/// Overlap: the reductions run bucket by bucket (`GradientBucketPlan`, in the order backward
/// finishes the parameters) while backward goes on: `LanguageModel.backward` reports how far it
/// has come (`gradientsFinished`), and every bucket all of whose parameters are finished is
/// started at once; `finishReduction` waits for the rest.
public final class DataParallel {
    /// The collectives.
    public let communicator: any Communicator
    /// The buckets, the same on every rank (checked when made).
    public let plan: GradientBucketPlan
    /// This rank, `0 ..< worldSize`.
    public var rank: Int { communicator.rank }
    /// The number of ranks.
    public var worldSize: Int { communicator.worldSize }

    /// The smallest parameter index of each bucket: once backward has finished every parameter
    /// from that index on, the bucket can be reduced.
    private let bucketFloors: [Int]
    /// Buckets started in the current backward pass.
    private var started = 0
    /// The first error of starting a reduction (reported by `finishReduction`).
    private var failure: Error?

    /// Data parallelism over `communicator` for a model with `parameters`.
    ///
    /// - Throws: `CommunicatorError` when another rank's bucket plan differs (another model).
    public init(communicator: any Communicator, parameters: [Parameter]) throws {
        self.communicator = communicator
        plan = GradientBucketPlan(parameters)
        bucketFloors = plan.buckets.map { $0.parameters.min() ?? 0 }
        try communicator.requireSameOnEveryRank(plan.signature, what: "gradient bucket plan (model)")
    }

    /// This rank's share of every global batch of `globalBatchSize` windows.
    ///
    /// - Throws: `TrainingError` (field `batchSize`) unless the number of ranks divides it.
    public func shard(globalBatchSize: Int) throws -> BatchShard {
        do {
            return try BatchShard(rank: rank, worldSize: worldSize, globalBatchSize: globalBatchSize)
        } catch let error as BatchShardError {
            throw TrainingError(error.description, field: "batchSize")
        }
    }

    /// Stops, naming this rank, unless every rank holds exactly rank 0's weights (the same seed or
    /// checkpoint gives the same numbers; anything else would train different models).
    public func requireSameWeights(_ parameters: [Parameter]) throws {
        try communicator.requireSameOnEveryRank(Self.fingerprint(parameters), what: "initial weights (fingerprint)")
    }

    /// A 64-bit FNV-1a hash of every parameter's name and float32 bits, in order, as 16 hex digits.
    static func fingerprint(_ parameters: [Parameter]) -> String {
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        func mix(_ word: UInt64) { hash = (hash ^ word) &* 0x0000_0100_0000_01b3 }
        for parameter in parameters {
            for byte in parameter.name.utf8 { mix(UInt64(byte)) }
            for value in parameter.value.array { mix(UInt64(value.bitPattern)) }
        }
        return String(hash, radix: 16)
    }

    /// Starts a backward pass whose gradients are to be averaged (the last micro-batch of a step).
    public func beginReduction() {
        started = 0
        failure = nil
    }

    /// Starts reducing every bucket whose parameters all have index `firstFinished` or more (the
    /// callback of `LanguageModel.backward`).
    public func gradientsFinished(from firstFinished: Int, parameters: [Parameter]) {
        while failure == nil && started < plan.buckets.count && bucketFloors[started] >= firstFinished {
            do {
                try communicator.allReduceAverage(plan.gradients(of: plan.buckets[started], in: parameters))
                started += 1
            } catch {
                failure = error
            }
        }
    }

    /// Starts what is left and waits until every gradient holds its mean over the ranks.
    ///
    /// - Throws: the communicator's error when a reduction failed or a rank stopped answering.
    public func finishReduction(parameters: [Parameter]) throws {
        gradientsFinished(from: 0, parameters: parameters)
        if let failure { throw failure }
        try communicator.finishReductions()
    }

    /// The mean of each of `values` over the ranks (losses, flags), through a tensor on `device`.
    public func average(_ values: [Float], on device: Device) throws -> [Float] {
        let tensor = Tensor(values, shape: [values.count], on: device)
        try communicator.allReduceAverage([tensor])
        try communicator.finishReductions()
        return tensor.array
    }
}

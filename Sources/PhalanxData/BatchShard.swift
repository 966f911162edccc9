import PhalanxRuntime

/// One rank's part of every global batch in data-parallel training: with `worldSize` ranks and a
/// global batch of `B` windows, rank `r` takes rows
///
///     r * B/W  ..<  (r + 1) * B/W
///
/// of the batch a single process would draw. Every rank runs the same global `BatchSampler`
/// (same seed, same global batch size) and draws all `B` starts, so the stream advances alike
/// everywhere; together the ranks see exactly the single-process batch, step after step, and a
/// sampler restored from a checkpoint gives every rank the same shard it would have had.
///
/// Each rank's loss is the mean over its `B/W` rows; the mean of the ranks' losses (and of their
/// gradients, as the all-reduce averages them) is then the mean over all `B` rows, as in one process.
public struct BatchShard: Equatable, Sendable {
    /// This rank, `0 ..< worldSize`.
    public let rank: Int
    /// The number of ranks.
    public let worldSize: Int
    /// The global batch size `B`.
    public let globalBatchSize: Int

    /// Rank `rank`'s shard of a global batch of `globalBatchSize` windows.
    ///
    /// - Throws: `BatchShardError` unless `0 <= rank < worldSize` and `worldSize` divides `globalBatchSize`.
    public init(rank: Int, worldSize: Int, globalBatchSize: Int) throws {
        guard worldSize >= 1, (0..<worldSize).contains(rank) else {
            throw BatchShardError("rank \(rank) is not in 0 ..< \(worldSize) (the world size)")
        }
        guard globalBatchSize > 0, globalBatchSize % worldSize == 0 else {
            throw BatchShardError("the batch size \(globalBatchSize) must be a positive multiple of the number of GPUs (\(worldSize)): "
                                  + "each GPU takes an equal share of every global batch (try \(max(1, globalBatchSize / worldSize) * worldSize))")
        }
        self.rank = rank
        self.worldSize = worldSize
        self.globalBatchSize = globalBatchSize
    }

    /// Windows per rank, `B / W`.
    public var localBatchSize: Int { globalBatchSize / worldSize }
    /// This rank's rows of the global batch.
    public var rows: Range<Int> { rank * localBatchSize ..< (rank + 1) * localBatchSize }
}

/// A batch cannot be split across ranks as asked; the message says why.
public struct BatchShardError: Error, CustomStringConvertible, Equatable {
    /// What is wrong.
    public let message: String
    init(_ message: String) { self.message = message }
    /// The message.
    public var description: String { message }
}

extension BatchSampler {
    /// This rank's rows of the next global batch: draws all `batchSize` starts (the stream moves
    /// as in `next(from:)`) and reads only the windows of `shard.rows`.
    public mutating func next(from split: TokenSplit, shard: BatchShard) -> Batch {
        require(shard.globalBatchSize == batchSize,
                "BatchSampler.next(shard:): the shard splits a batch of \(shard.globalBatchSize), the sampler draws \(batchSize)")
        let starts = nextStarts(in: split)
        return Batch(split: split, starts: Array(starts[shard.rows]), contextLength: contextLength)
    }
}

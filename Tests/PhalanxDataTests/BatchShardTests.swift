import Foundation
import PhalanxData
import Testing

@Suite("Batch sharding across ranks")
struct BatchShardTests {
    /// Tokens equal to their positions, so a window's values show where it was cut.
    static let positions = TokenSplit((0..<5000).map { Int32($0) })

    /// Row `rows` of `batch` as (inputs, targets) slices.
    private func rows(_ batch: Batch, _ rows: Range<Int>) -> ([Int32], [Int32]) {
        let t = batch.contextLength
        return (Array(batch.inputs[rows.lowerBound * t ..< rows.upperBound * t]), Array(batch.targets[rows.lowerBound * t ..< rows.upperBound * t]))
    }

    @Test("rank r takes rows r*B/W ..< (r+1)*B/W; the ranks together are the single-process batch, step after step",
          arguments: [1, 2, 4, 8])
    func unionIsSingleProcessBatch(worldSize: Int) throws {
        let batchSize = 8, contextLength = 33
        var single = BatchSampler(batchSize: batchSize, contextLength: contextLength, seed: 7)
        var ranks = [BatchSampler](repeating: single, count: worldSize)
        let shards = try (0..<worldSize).map { try BatchShard(rank: $0, worldSize: worldSize, globalBatchSize: batchSize) }
        for _ in 0..<25 {
            let global = single.next(from: Self.positions)
            var inputs: [Int32] = [], targets: [Int32] = []
            for rank in 0..<worldSize {
                let part = ranks[rank].next(from: Self.positions, shard: shards[rank])
                #expect(part.batchSize == batchSize / worldSize && part.contextLength == contextLength)
                let expected = rows(global, shards[rank].rows)
                #expect(part.inputs == expected.0 && part.targets == expected.1)
                inputs += part.inputs
                targets += part.targets
            }
            #expect(inputs == global.inputs && targets == global.targets)
        }
        // Every rank's stream stands where the single process's does.
        #expect(ranks.allSatisfy { $0 == single })
    }

    @Test("shards of different ranks are disjoint rows")
    func disjoint() throws {
        let shards = try (0..<4).map { try BatchShard(rank: $0, worldSize: 4, globalBatchSize: 12) }
        #expect(shards.map(\.rows) == [0..<3, 3..<6, 6..<9, 9..<12])
        #expect(shards.allSatisfy { $0.localBatchSize == 3 })
    }

    @Test("resuming from a saved sampler gives every rank the shard the uninterrupted run would have had")
    func resume() throws {
        let shard = try BatchShard(rank: 1, worldSize: 2, globalBatchSize: 4)
        var sampler = BatchSampler(batchSize: 4, contextLength: 16, seed: 3)
        for _ in 0..<5 { _ = sampler.next(from: Self.positions, shard: shard) }
        let saved = try JSONEncoder().encode(sampler)
        let uninterrupted = (0..<4).map { _ in sampler.next(from: Self.positions, shard: shard) }
        var restored = try JSONDecoder().decode(BatchSampler.self, from: saved)
        #expect((0..<4).map { _ in restored.next(from: Self.positions, shard: shard) } == uninterrupted)
        // A restored sampler resumed with another world size continues the same global stream.
        var global = try JSONDecoder().decode(BatchSampler.self, from: saved)
        let whole = try BatchShard(rank: 0, worldSize: 1, globalBatchSize: 4)
        let next = global.next(from: Self.positions, shard: whole)
        #expect(rows(next, 2..<4).0 == uninterrupted[0].inputs)
    }

    @Test("a batch that the world size does not divide, or a rank outside the world, is a clear error")
    func errors() {
        #expect(throws: BatchShardError.self) { try BatchShard(rank: 0, worldSize: 3, globalBatchSize: 8) }
        #expect { try BatchShard(rank: 0, worldSize: 3, globalBatchSize: 8) } throws: { error in
            "\(error)".contains("multiple of the number of GPUs (3)") && "\(error)".contains("try 6")
        }
        #expect { try BatchShard(rank: 2, worldSize: 2, globalBatchSize: 8) } throws: { "\($0)".contains("rank 2 is not in 0 ..< 2") }
        #expect(throws: BatchShardError.self) { try BatchShard(rank: 0, worldSize: 0, globalBatchSize: 8) }
    }
}

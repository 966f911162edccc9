import PhalanxRuntime

/// How an operator call is cut into independent items for the worker pool.
///
/// Sequences and groups of heads are independent, so they are the first source of parallelism
/// (each item streams over its rows once). Only when there are fewer sequence-head pairs than
/// threads is the time axis cut too: that needs a halo (jagged window) or a carrier scan between
/// chunks (exact recurrence), the hierarchical decomposition of SWR.md section 2.
struct Partition {
    /// Consecutive ranges of heads handled by one item.
    let headGroups: [Range<Int>]
    /// Time chunks wanted per sequence (a sequence gets fewer if it is short).
    let timeChunks: Int
    /// Shortest chunk worth a separate item, in rows.
    let minimumChunkRows: Int

    init(_ layout: SequenceLayout, threads: Int, minimumChunkRows: Int = 2048) {
        let sequences = max(layout.sequenceCount, 1)
        let wantedItems = 2 * threads
        let groups = min(layout.heads, max(1, (wantedItems + sequences - 1) / sequences))
        headGroups = (0..<groups).map { g in
            (g * layout.heads / groups)..<((g + 1) * layout.heads / groups)
        }
        let pairs = sequences * layout.heads
        timeChunks = pairs >= threads ? 1 : (wantedItems + pairs - 1) / pairs
        self.minimumChunkRows = minimumChunkRows
    }

    /// Chunk start positions (relative to the sequence) for a sequence of `length` rows, each a
    /// multiple of `alignment` past `firstBoundary`, always beginning with 0.
    func chunkStarts(length: Int, firstBoundary: Int, alignment: Int) -> [Int] {
        let chunks = min(timeChunks, length / minimumChunkRows)
        guard chunks > 1 else { return [0] }
        let alignedRows = max(length - firstBoundary, 0)
        let step = ((alignedRows / chunks + alignment - 1) / alignment) * alignment
        guard step > 0 else { return [0] }
        var starts = [0]
        var p = firstBoundary + step
        while p < length {
            starts.append(p)
            p += step
        }
        return starts
    }
}

/// One item of a partitioned call: a sequence, a range of its heads, a range of its rows.
struct WorkItem {
    let sequence: Int
    let heads: Range<Int>
    let rows: Range<Int>
    let isFirstChunk: Bool
    let isLastChunk: Bool

    /// Every item of a partition, sequence-major.
    static func all(_ layout: SequenceLayout, _ partition: Partition,
                    chunkStarts: (Int) -> [Int]) -> [WorkItem] {
        var items: [WorkItem] = []
        for s in 0..<layout.sequenceCount {
            let starts = chunkStarts(s)
            let ends = Array(starts.dropFirst()) + [layout.lengths[s]]
            for group in partition.headGroups {
                for c in starts.indices {
                    items.append(WorkItem(sequence: s, heads: group, rows: starts[c]..<ends[c],
                                          isFirstChunk: c == 0, isLastChunk: c == starts.count - 1))
                }
            }
        }
        return items
    }
}

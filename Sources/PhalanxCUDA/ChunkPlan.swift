import PhalanxRuntime

/// How the time-chunked kernels (`jagged_window.cu`, `phalanx_layer.cu`) cut a uniform batch into
/// GPU threads: one thread per (sequence, chunk of `chunkBlocks` blocks of `blockLength` rows,
/// lane of a row), in one-dimensional thread blocks of `threadsPerBlock`.
///
/// The automatic chunk length is the shortest that still gives at most one thread to every slot
/// of one full wave of the device (`residentThreads`: resident thread blocks per multiprocessor,
/// from the kernel's registers, times threads per block, times multiprocessors): the least halo
/// re-reading (one neighbouring block per chunk) that keeps the whole device busy.
public struct ChunkPlan: Hashable, Sendable, CustomStringConvertible {
    /// Blocks per thread.
    public let chunkBlocks: Int
    /// Threads that do work (`batch * chunks * lanesPerRow`).
    public let threads: Int
    /// Thread blocks to launch: `ceil(threads / threadsPerBlock)`.
    public let gridBlocks: Int

    /// - Parameters:
    ///   - lanesPerRow: threads per row of a chunk (heads times threads per head).
    ///   - chunkBlocks: a fixed chunk length (clamped to the sequence's blocks), or nil for the
    ///     automatic one from `residentThreads`.
    public init(batch: Int, length: Int, blockLength: Int, lanesPerRow: Int, threadsPerBlock: Int, chunkBlocks: Int? = nil,
                residentThreads: Int) {
        require(batch >= 0 && length >= 0 && blockLength >= 1 && lanesPerRow >= 1 && threadsPerBlock >= 1 && residentThreads >= 0,
                "ChunkPlan: batch \(batch), length \(length), blockLength \(blockLength), lanesPerRow \(lanesPerRow), threadsPerBlock \(threadsPerBlock), residentThreads \(residentThreads)")
        require((chunkBlocks ?? 1) >= 1, "ChunkPlan: chunkBlocks must be at least 1, got \(chunkBlocks!)")
        let blocks = max((length + blockLength - 1) / blockLength, 1)
        let chunk: Int
        if let chunkBlocks {
            chunk = min(chunkBlocks, blocks)
        } else {
            let wave = max(residentThreads, 1)
            chunk = min(blocks, max(1, (batch * blocks * lanesPerRow + wave - 1) / wave))
        }
        self.chunkBlocks = chunk
        threads = batch * ((blocks + chunk - 1) / chunk) * lanesPerRow
        gridBlocks = (threads + threadsPerBlock - 1) / threadsPerBlock
    }

    /// Chunk length, working threads and thread blocks, for reports.
    public var description: String { "\(chunkBlocks) blocks per chunk, \(threads) threads, \(gridBlocks) thread blocks" }
}

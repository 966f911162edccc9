import PhalanxRuntime
import SWR

/// `JaggedWindow.standardHeadDim`, short for the layouts below.
private let D = JaggedWindow.standardHeadDim

/// Decoding the Phalanx layer on a CUDA device from its recurrence state (`Kernels/phalanx_decode.cu`):
/// the element-wise middle of the layer continued from a per-sequence state, and the state left
/// by the parallel forward kernel after a prompt.
///
///     step:  per row, a = scale * sigmoid(z_a + bias_a); g *= a; w = a w + sigmoid(z_b + bias_b) v;
///            mixed = (g carrier + w) (z_c + bias_c) + v; at a block's end carrier = w, w = 0, g = 1
///
/// State, float32: `local` and `carrier` `[batch, H, 16]`, `gate` `[batch, H]`; `offsets`
/// `[batch]` int32 (each sequence's position inside its block). `z` `[batch * n, stride]` without
/// bias and `mixed` `[batch * n, H*16]` in `storage`, as `CUDAPhalanxKernels` lays them out.
/// One set per device, storage and block length (`CUDADevice.kernels`).
public final class CUDAPhalanxDecodeKernels: @unchecked Sendable {
    /// The GPU the kernels run on, on its stream.
    public let context: CUDAContext
    /// How `z` and `mixed` store their numbers.
    public let storage: NumberFormat
    /// Positions per block of the jagged window, `l`.
    public let blockLength: Int
    private let stepKernel, stateKernel: CUDAContext.Function

    /// Compiles (once per context) and loads the kernels for `storage` and `blockLength`.
    ///
    /// - Throws: `CUDAUnavailable` without NVRTC or the kernel sources; `NVRTCError`, `CUDAError`.
    public init(context: CUDAContext, storage: NumberFormat, blockLength: Int) throws {
        require(CUDAPhalanxKernels.blockLengths.contains(blockLength),
                "CUDAPhalanxDecodeKernels: the kernels take block lengths \(CUDAPhalanxKernels.blockLengths), not \(blockLength)")
        (self.context, self.storage, self.blockLength) = (context, storage, blockLength)
        let source = try ["jagged_window", "phalanx_layer", "phalanx_decode"].map { try KernelSources.source(named: $0) }
            .joined(separator: "\n")
        let functions = try context.functions(["phalanx_step_\(storage)", "phalanx_state_after_forward_\(storage)"], source: source,
                                              sourceName: "phalanx_decode.cu", options: KernelSources.definitions(blockLength: blockLength))
        (stepKernel, stateKernel) = (functions[0], functions[1])
    }

    /// The set for `storage` and `blockLength` on `device`, compiled the first time.
    public static func on(_ device: CUDADevice, storage: NumberFormat, blockLength: Int) throws -> CUDAPhalanxDecodeKernels {
        try device.kernels("\(storage)/l\(blockLength)") {
            try CUDAPhalanxDecodeKernels(context: device.context, storage: storage, blockLength: blockLength)
        }
    }

    /// Continues every sequence by `n` rows from the state, writing `mixed` and leaving the state
    /// after the last row (`offsets` are read, not advanced: the caller keeps them); queued.
    public func step(z: DeviceBuffer, bias: DeviceBuffer, mixed: DeviceBuffer, local: DeviceBuffer, gate: DeviceBuffer,
                     carrier: DeviceBuffer, offsets: DeviceBuffer, batch: Int, n: Int, shape: CUDAPhalanxKernels.Shape) throws {
        let threads = batch * shape.heads * D
        check(z, batch * n * shape.stride, storage, "step: z")
        check(mixed, batch * n * shape.heads * D, storage, "step: mixed")
        check(local, threads, .float32, "step: local")
        check(carrier, threads, .float32, "step: carrier")
        check(gate, batch * shape.heads, .float32, "step: gate")
        guard threads > 0, n > 0 else { return }
        try context.launch(stepKernel, grid: ((threads + 127) / 128, 1, 1), block: (128, 1, 1), arguments: [
            .buffer(z), .buffer(bias), .buffer(mixed), .buffer(local), .buffer(gate), .buffer(carrier), .buffer(offsets),
            .int32(Int32(batch)), .int32(Int32(n)), .int32(Int32(shape.heads)), .int32(Int32(shape.kvHeads)),
            .int64(Int64(shape.stride)), .float32(shape.gateScale),
        ])
    }

    /// The state after `CUDAPhalanxKernels.forward` over `n >= 1` rows from the start of every
    /// sequence, from its `carriers` `[batch, ceil(n / l), H, 16]` and `z`; queued. The offsets are
    /// `n % l`, kept by the caller.
    public func stateAfterForward(z: DeviceBuffer, bias: DeviceBuffer, carriers: DeviceBuffer, local: DeviceBuffer,
                                  gate: DeviceBuffer, carrier: DeviceBuffer, batch: Int, n: Int,
                                  shape: CUDAPhalanxKernels.Shape) throws {
        let threads = batch * shape.heads * D
        check(z, batch * n * shape.stride, storage, "stateAfterForward: z")
        check(carriers, batch * ((n + blockLength - 1) / blockLength) * shape.heads * D, .float32, "stateAfterForward: carriers")
        check(local, threads, .float32, "stateAfterForward: local")
        guard threads > 0, n > 0 else { return }
        try context.launch(stateKernel, grid: ((threads + 127) / 128, 1, 1), block: (128, 1, 1), arguments: [
            .buffer(z), .buffer(bias), .buffer(carriers), .buffer(local), .buffer(gate), .buffer(carrier),
            .int32(Int32(batch)), .int32(Int32(n)), .int32(Int32(shape.heads)), .int32(Int32(shape.kvHeads)),
            .int64(Int64(shape.stride)), .float32(shape.gateScale),
        ])
    }

    private func check(_ buffer: DeviceBuffer, _ count: Int, _ format: NumberFormat, _ label: String) {
        require(buffer.context === context, "CUDAPhalanxDecodeKernels.\(label) belongs to another CUDAContext")
        require(buffer.byteCount >= count * format.byteCount,
                "CUDAPhalanxDecodeKernels.\(label) holds \(buffer.byteCount) bytes, expected \(count) \(format) numbers")
    }
}

/// Attention while decoding on a CUDA device (`Kernels/attention_decode.cu`): a chunk's queries
/// against a paged key/value cache plus the chunk's own keys, the rotary embedding at each
/// sequence's own positions, and appending the chunk to the cache.
///
/// For row `i` of sequence `b` at position `p = starts[b] + i`, head `h` (kv head `h / (H / KVH)`):
///
///     o = sum_j softmax_j(scale * q . k_j) v_j    over max(0, p - window + 1) <= j <= p
///
/// keys and values of positions below `starts[b]` from the cache, the others from the chunk.
/// Flash-decoding: the visible positions are cut into splits of `splitLength`, one warp each
/// (online softmax), and the splits of each row and head are added in order by a second kernel
/// (no atomics: the same bits on every run).
///
/// Layouts: queries and outputs `[batch, n, H, D]`, the chunk's keys and values `[batch, n, KVH,
/// D]`, in `storage`; `starts` `[batch]` int32. A cache page holds `slots` positions of every
/// sequence, `[batch, KVH, slots, D]`; the page table `[2, pages]` holds the device addresses of
/// the key pages, then of the value pages. Position `p` lives in page `p / slots` at slot
/// `p % slots`, or, in a ring (`ring`: one page of `slots` positions, the sliding window), at slot
/// `p % slots` of page 0.
public final class CUDADecodeAttention: @unchecked Sendable {
    /// The GPU every call runs on, on its stream.
    public let context: CUDAContext
    /// How queries, keys, values and outputs are stored.
    public let storage: NumberFormat
    /// Channels per head, compiled in: one of `headDims`.
    public let headDim: Int
    /// The head dims the kernels take: a row is read by a power-of-two group of lanes, 16 bytes each.
    public static let headDims = [16, 32, 64, 128]
    /// Positions one warp scores (`kSplit` in the kernel).
    public static let splitLength = 256
    private let attendKernel, combineKernel, rotateKernel, appendKernel: CUDAContext.Function

    /// Where a cache's pages are, as the kernels read them.
    public struct Pages {
        /// `[2, pages]` addresses: key pages, then value pages.
        public let table: DeviceBuffer
        /// Pages in the table, positions per page, and whether the one page is a ring.
        public let count: Int, slots: Int, ring: Bool
        /// Sequences and key/value heads of every page.
        public let batch: Int, kvHeads: Int

        /// Pages as described; `table` must hold `2 * count` addresses.
        public init(table: DeviceBuffer, count: Int, slots: Int, ring: Bool, batch: Int, kvHeads: Int) {
            require(table.byteCount >= 16 * count && (!ring || count == 1) && slots >= 1,
                    "CUDADecodeAttention.Pages: a table of \(table.byteCount) bytes for \(count) pages of \(slots) slots, ring \(ring)")
            (self.table, self.count, self.slots, self.ring, self.batch, self.kvHeads) = (table, count, slots, ring, batch, kvHeads)
        }

        fileprivate var arguments: [CUDAContext.Argument] {
            [.buffer(table), .int32(Int32(count)), .int32(Int32(slots)), .int32(ring ? 1 : 0), .int32(Int32(batch)),
             .int32(Int32(kvHeads))]
        }
    }

    /// Compiles (once per context and head dim) and loads the kernels.
    ///
    /// - Throws: `CUDAUnavailable` without NVRTC or the kernel sources, `NVRTCError`, `CUDAError`.
    public init(context: CUDAContext, storage: NumberFormat, headDim: Int) throws {
        require(Self.headDims.contains(headDim), "CUDADecodeAttention: the kernels take head dims \(Self.headDims), got \(headDim)")
        (self.context, self.storage, self.headDim) = (context, storage, headDim)
        let names = ["decode_attend", "decode_combine", "decode_rotate", "decode_append"].map { "\($0)_\(storage)" }
        let functions = try context.functions(names, source: try KernelSources.source(named: "attention_decode"),
                                              sourceName: "attention_decode.cu", options: ["-DATTN_HEAD_DIM=\(headDim)"])
        (attendKernel, combineKernel, rotateKernel, appendKernel) = (functions[0], functions[1], functions[2], functions[3])
    }

    /// The set for `storage` and `headDim` on `device`, compiled the first time.
    public static func on(_ device: CUDADevice, storage: NumberFormat, headDim: Int) throws -> CUDADecodeAttention {
        try device.kernels("\(storage)/d\(headDim)") { try CUDADecodeAttention(context: device.context, storage: storage, headDim: headDim) }
    }

    /// Rotates `queries` `[batch, n, heads, D]` and `keys` `[batch, n, kvHeads, D]` in place, row
    /// `i` of sequence `b` at position `starts[b] + i`, by the tables `cosines`, `sines`
    /// `[positions, D/2]` float32 (which must cover every position); queued.
    public func rotate(queries: DeviceBuffer, keys: DeviceBuffer, starts: DeviceBuffer, cosines: DeviceBuffer, sines: DeviceBuffer,
                       batch: Int, n: Int, heads: Int, kvHeads: Int) throws {
        let rows = batch * n, threads = rows * (heads + kvHeads) * headDim / 2
        guard threads > 0 else { return }
        try context.launch(rotateKernel, grid: ((threads + 255) / 256, 1, 1), block: (256, 1, 1), arguments: [
            .buffer(queries), .buffer(keys), .buffer(starts), .buffer(cosines), .buffer(sines), .int32(Int32(n)),
            .int32(Int32(heads)), .int32(Int32(kvHeads)), .int64(Int64(rows)),
        ])
    }

    /// `outputs` `[batch, n, heads, D]`: each row's attention over the cache below its sequence's
    /// start and the chunk's own `keys` and `values` up to itself (within `window` when given);
    /// `longestSpan` bounds the positions any row sees (it sets the number of splits); queued.
    public func attend(queries: DeviceBuffer, keys: DeviceBuffer, values: DeviceBuffer, outputs: DeviceBuffer, starts: DeviceBuffer,
                       pages: Pages, n: Int, heads: Int, window: Int?, longestSpan: Int, scale: Float) throws {
        let rows = pages.batch * n, queryCount = rows * heads * headDim, keyCount = rows * pages.kvHeads * headDim
        require(heads % pages.kvHeads == 0, "CUDADecodeAttention.attend: \(heads) heads are not divisible into \(pages.kvHeads) key/value heads")
        for (label, buffer, count) in [("queries", queries, queryCount), ("outputs", outputs, queryCount), ("keys", keys, keyCount),
                                       ("values", values, keyCount)] {
            require(buffer.byteCount >= count * storage.byteCount,
                    "CUDADecodeAttention.attend: \(label) holds \(buffer.byteCount) bytes, expected \(count) \(storage) numbers")
        }
        guard rows > 0 else { return }
        require(heads <= 65535 && longestSpan <= 4 * 65535 * Self.splitLength,
                "CUDADecodeAttention.attend: \(heads) heads and spans of \(longestSpan) positions exceed the launch grid")
        let splits = max(1, (longestSpan + Self.splitLength - 1) / Self.splitLength)
        let partialCount = splits == 1 ? 1 : rows * heads * splits
        let maxima = try DeviceBuffer(context: context, byteCount: partialCount * 4)
        let sums = try DeviceBuffer(context: context, byteCount: partialCount * 4)
        let partialValues = try DeviceBuffer(context: context, byteCount: partialCount * (splits == 1 ? 1 : headDim) * 4)
        try context.launch(attendKernel, grid: (rows, heads, (splits + 3) / 4), block: (128, 1, 1), arguments: [
            .buffer(queries), .buffer(outputs), .buffer(starts)] + pages.arguments + [.int32(Int32(n)), .buffer(keys), .buffer(values),
            .buffer(maxima), .buffer(sums), .buffer(partialValues), .int32(Int32(heads)), .int32(Int32(window ?? 0)),
            .int32(Int32(splits)), .float32(scale),
        ])
        if splits > 1 {
            try context.launch(combineKernel, grid: ((rows * heads + 3) / 4, 1, 1), block: (128, 1, 1), arguments: [
                .buffer(maxima), .buffer(sums), .buffer(partialValues), .buffer(outputs), .int64(Int64(rows * heads)),
                .int32(Int32(splits)),
            ])
        }
        withExtendedLifetime((maxima, sums, partialValues)) {}
    }

    /// Writes the chunk's `keys` and `values` `[batch, n, kvHeads, D]` into the cache at each
    /// sequence's positions from `starts[b]` (a ring keeps the last `slots`); queued.
    public func append(keys: DeviceBuffer, values: DeviceBuffer, starts: DeviceBuffer, pages: Pages, n: Int) throws {
        let rows = pages.batch * n, threads = rows * pages.kvHeads * headDim * storage.byteCount / 16
        guard threads > 0 else { return }
        try context.launch(appendKernel, grid: ((threads + 255) / 256, 1, 1), block: (256, 1, 1), arguments: [
            .buffer(keys), .buffer(values), .buffer(starts)] + pages.arguments + [.int32(Int32(n)), .int64(Int64(rows))])
    }
}

import PhalanxRuntime
import SWR

/// `JaggedWindow.standardHeadDim`, short for the layouts below.
private let D = JaggedWindow.standardHeadDim

/// The two fused kernels of the Phalanx token mixer (SWR.md section 6) on a CUDA device: the
/// element-wise work between the layer's matrix products (the layer, `PhalanxLayer` in
/// PhalanxLayers, runs the products with cuBLAS on its own parameters).
///
///     forward:  mixed = phalanx_forward(z + bias)     a = gateScale * sigmoid(z_a), b = sigmoid(z_b),
///                                                       c = z_c, v = z_v, s = SWR_jagged(a, b * v)
///                                                       (block l, k = 2), mixed = s * c + v
///     backward: dz = phalanx_backward(z, dmixed)  (+ a group sum when KVH < H);  dbias += 1^T dz
///
/// The kernels recompute gates, `b * v` and `s` from `z` instead of storing them, so forward keeps
/// only `z`, `mixed` and each block's carrier (1/l of a row per head) for backward (see
/// `Kernels/phalanx_layer.cu`). The bias gradient is a matrix product with a column of ones
/// (cuBLAS, a fixed order of additions) rather than atomics in the kernel: every result is the
/// same bits from run to run.
///
/// Layouts (row-major; rows = batch * length, sequence by sequence): `z` and `dz` `[rows, stride]`
/// with columns `b [KVH*16] | c [KVH*16] | v [H*16] | a [H]` then padding (`Shape`); `mixed` and
/// `dmixed` `[rows, H*16]`; in `storage`. `bias` and its gradient `[width]` float32 (the `v` part
/// zero); carriers `[batch, ceil(length / l), H, 16]` float32.
///
/// One set per device, storage and block length (`CUDADevice.kernels`); not thread-safe.
public final class CUDAPhalanxKernels: @unchecked Sendable {
    /// Which compiled variant of each kernel runs, and how work is cut: changes speed, never
    /// results (up to the order of float32 sums). The defaults were measured fastest on an H200 at
    /// dim 2048 and 32K tokens (`phalanx bench cuda` times every variant).
    public struct Tuning: Hashable, Sendable, CustomStringConvertible {
        /// Channels per thread of the forward kernel (4 or 8) and rows of z whose loads it issues
        /// together: (4, 1), (4, 4), (8, 1) or (8, 2).
        public var forwardChannels: Int, forwardRows: Int
        /// Rows whose loads the backward kernel issues together: 1, 2 or 4 (it keeps each block's
        /// forward scan in shared memory; more rows in flight cost registers).
        public var backwardRows: Int
        /// Blocks of `blockLength` rows per thread; nil chooses one wave of the device (`ChunkPlan`).
        public var chunkBlocks: Int?

        /// A tuning of compiled variants (see `forwardVariants`, `backwardVariants`) and chunk length (nil:
        /// automatic); checked when assigned to `tuning`.
        public init(forwardChannels: Int = 8, forwardRows: Int = 2, backwardRows: Int = 2, chunkBlocks: Int? = nil) {
            (self.forwardChannels, self.forwardRows) = (forwardChannels, forwardRows)
            (self.backwardRows, self.chunkBlocks) = (backwardRows, chunkBlocks)
        }

        /// The compiled variants: forward (channels, rows), backward rows.
        public static let forwardVariants = [(4, 1), (4, 4), (8, 1), (8, 2)]
        /// The compiled backward variants: rows issued together.
        public static let backwardVariants = [1, 2, 4]

        var forwardSuffix: String { "v\(forwardChannels)_r\(forwardRows)" }
        var backwardSuffix: String { "v4_s\(backwardRows)" }

        /// The forward and backward variants and the chunk length, for reports.
        public var description: String {
            "fwd \(forwardChannels) channels \(forwardRows) rows, bwd \(backwardRows) rows, chunk \(chunkBlocks.map(String.init) ?? "auto")"
        }
    }

    /// One layer's shape as the kernels see it: heads, gate scale, and where each projection sits
    /// in a row of `z` (the layer's `Columns`: `b`, `c`, `v`, `a` offsets, `width` used, `stride`
    /// the row pitch, a multiple of 8).
    public struct Shape: Hashable, Sendable {
        /// Heads `H` and key/value heads `KVH` (dividing `H`).
        public let heads: Int, kvHeads: Int
        /// Multiplies the gate sigmoid.
        public let gateScale: Float
        /// Column offsets in a row of `z`.
        public let b: Int, c: Int, v: Int, a: Int, width: Int, stride: Int

        /// A shape; `stride` must be a multiple of 8 and at least `width`.
        public init(heads: Int, kvHeads: Int, gateScale: Float, b: Int, c: Int, v: Int, a: Int, width: Int, stride: Int) {
            require(heads >= 1 && kvHeads >= 1 && heads % kvHeads == 0 && stride >= width && stride % 8 == 0,
                    "CUDAPhalanxKernels.Shape: heads \(heads), kvHeads \(kvHeads), width \(width), stride \(stride)")
            (self.heads, self.kvHeads, self.gateScale) = (heads, kvHeads, gateScale)
            (self.b, self.c, self.v, self.a, self.width, self.stride) = (b, c, v, a, width, stride)
        }
    }

    /// The block lengths the kernels compile for: multiples of 8 (rows load in groups of up to 8)
    /// up to 16 (a block's gates and values fill the backward kernel's shared memory).
    public static let blockLengths = [8, 16]
    /// Threads per thread block of the kernels.
    public let threadsPerBlock = 128
    /// The GPU the kernels run on, on its stream.
    public let context: CUDAContext
    /// How `z`, `mixed` and their gradients store their numbers.
    public let storage: NumberFormat
    /// Positions per block of the jagged window, `l`.
    public let blockLength: Int
    /// The kernel variants and work split (see `Tuning`).
    public var tuning = Tuning() {
        didSet {
            require((tuning.chunkBlocks ?? 1) >= 1, "CUDAPhalanxKernels: chunkBlocks must be at least 1, got \(tuning.chunkBlocks!)")
            for name in ["phalanx_forward_\(storage)_\(tuning.forwardSuffix)", "phalanx_backward_\(storage)_\(tuning.backwardSuffix)"] {
                require(kernels[name] != nil,
                        "CUDAPhalanxKernels: no kernel \(name) for \(tuning); available: \(kernels.keys.sorted().joined(separator: ", "))")
            }
        }
    }
    private let kernels: [String: CUDAContext.Function]
    private var onesBuffer: DeviceBuffer?

    /// Compiles (once per context) and loads every variant for `storage` and `blockLength`.
    ///
    /// - Throws: `CUDAUnavailable` without NVRTC or the kernel sources; `NVRTCError`, `CUDAError`.
    public init(context: CUDAContext, storage: NumberFormat, blockLength: Int) throws {
        require(Self.blockLengths.contains(blockLength),
                "CUDAPhalanxKernels: the kernels take block lengths \(Self.blockLengths), not \(blockLength)")
        self.context = context
        self.storage = storage
        self.blockLength = blockLength
        let type = storage.description
        let kernelNames = Tuning.forwardVariants.map { "phalanx_forward_\(type)_v\($0.0)_r\($0.1)" }
            + Tuning.backwardVariants.map { "phalanx_backward_\(type)_v4_s\($0)" } + ["phalanx_group_sum_\(type)"]
        let source = try KernelSources.source(named: "jagged_window") + "\n" + KernelSources.source(named: "phalanx_layer")
        let functions = try context.functions(kernelNames, source: source, sourceName: "phalanx_layer.cu",
                                              options: KernelSources.definitions(blockLength: blockLength))
        kernels = Dictionary(uniqueKeysWithValues: zip(kernelNames, functions))
    }

    /// The set for `storage` and `blockLength` on `device`, compiled the first time.
    public static func on(_ device: CUDADevice, storage: NumberFormat, blockLength: Int) throws -> CUDAPhalanxKernels {
        try device.kernels("\(storage)/l\(blockLength)") {
            try CUDAPhalanxKernels(context: device.context, storage: storage, blockLength: blockLength)
        }
    }

    /// Blocks of `l` covering `length` positions: the carriers' second dimension.
    public func blocks(length: Int) -> Int { (length + blockLength - 1) / blockLength }

    /// `mixed` `[rows, H*16]` and the carriers from `z` `[rows, stride]` (without bias), queued.
    public func forward(z: DeviceBuffer, bias: DeviceBuffer, mixed: DeviceBuffer, carriers: DeviceBuffer,
                        batch: Int, length: Int, shape: Shape) throws {
        let rows = batch * length
        check(z, rows * shape.stride, storage, "forward: z")
        check(bias, shape.width, .float32, "forward: bias")
        check(mixed, rows * shape.heads * D, storage, "forward: mixed")
        check(carriers, batch * blocks(length: length) * shape.heads * D, .float32, "forward: carriers")
        guard rows > 0 else { return }
        let kernel = kernels["phalanx_forward_\(storage)_\(tuning.forwardSuffix)"]!
        let plan = try self.plan(kernel, channels: tuning.forwardChannels, batch: batch, length: length, heads: shape.heads)
        try context.launch(kernel, grid: (plan.gridBlocks, 1, 1), block: (threadsPerBlock, 1, 1), arguments: [
            .buffer(z), .buffer(bias), .buffer(mixed), .buffer(carriers)] + arguments(batch: batch, length: length, shape, plan))
    }

    /// `dz` `[rows, stride]` for `dmixed` `[rows, H*16]` (and the group sums when KVH < H), then
    /// `biasGradient[j] += sum over rows of dz[:, j]` (float32 `[width]`) for the `b`, `c` and `a`
    /// columns with `blas`; queued. `dz`'s padding columns are not written.
    public func backward(z: DeviceBuffer, bias: DeviceBuffer, dMixed: DeviceBuffer, carriers: DeviceBuffer,
                         dz: DeviceBuffer, biasGradient: DeviceBuffer, batch: Int, length: Int, shape: Shape,
                         blas: CUBLAS) throws {
        let H = shape.heads, KVH = shape.kvHeads, rows = batch * length, width = H * D
        check(z, rows * shape.stride, storage, "backward: z")
        check(dz, rows * shape.stride, storage, "backward: dz")
        check(dMixed, rows * width, storage, "backward: dmixed")
        check(biasGradient, shape.width, .float32, "backward: biasGradient")
        guard rows > 0 else { return }
        // Per-head dz_b and dz_c terms: dz's own columns when every head has its kv head, else scratch.
        let scratch = KVH == H ? nil : (b: try DeviceBuffer(context: context, byteCount: rows * width * storage.byteCount),
                                        c: try DeviceBuffer(context: context, byteCount: rows * width * storage.byteCount))
        let headTargets: [CUDAContext.Argument] = scratch.map {
            [.buffer($0.b), .int64(0), .buffer($0.c), .int64(0), .int64(Int64(width))]
        } ?? [.buffer(dz), .int64(Int64(shape.b)), .buffer(dz), .int64(Int64(shape.c)), .int64(Int64(shape.stride))]
        let kernel = kernels["phalanx_backward_\(storage)_\(tuning.backwardSuffix)"]!
        let plan = try self.plan(kernel, channels: 4, batch: batch, length: length, heads: H)
        try context.launch(kernel, grid: (plan.gridBlocks, 1, 1), block: (threadsPerBlock, 1, 1), arguments: [
            .buffer(z), .buffer(bias), .buffer(dMixed), .buffer(carriers), .buffer(dz)] + headTargets
            + arguments(batch: batch, length: length, shape, plan))
        if let scratch {
            let sums = rows * KVH * D
            for (source, column) in [(scratch.b, shape.b), (scratch.c, shape.c)] {
                try context.launch(kernels["phalanx_group_sum_\(storage)"]!, grid: ((sums + 255) / 256, 1, 1), block: (256, 1, 1),
                                   arguments: [
                                       .buffer(source), .buffer(dz), .int64(Int64(rows)), .int32(Int32(H)), .int32(Int32(KVH)),
                                       .int64(Int64(shape.stride)), .int32(Int32(column)),
                                   ])
            }
        }
        // 1^T dz over the columns with a bias: b and c (contiguous), then a.
        let ones = try self.ones(rows)
        for (first, end) in [(shape.b, shape.v), (shape.a, shape.width)] {
            try blas.gemm(.init(ones, storage, rows: 1, columns: rows),
                          .init(dz, storage, rows: rows, columns: end - first, stride: shape.stride, offset: first),
                          into: .init(biasGradient, .float32, rows: 1, columns: end - first, offset: first), beta: 1)
        }
    }

    /// `count` ones in `storage` (a buffer kept and grown as needed; uploaded when it grows).
    private func ones(_ count: Int) throws -> DeviceBuffer {
        if let ones = onesBuffer, ones.byteCount >= count * storage.byteCount { return ones }
        let values = [Float](repeating: 1, count: max(count, 2 * (onesBuffer?.byteCount ?? 0) / storage.byteCount))
        let ones = try storage.upload(values, context: context)
        onesBuffer = ones
        return ones
    }

    /// The chunk length in blocks that the forward (or backward) kernel uses for this shape.
    public func chunkBlocks(batch: Int, length: Int, heads: Int, backward: Bool) throws -> Int {
        let name = backward ? "phalanx_backward_\(storage)_\(tuning.backwardSuffix)" : "phalanx_forward_\(storage)_\(tuning.forwardSuffix)"
        return try plan(kernels[name]!, channels: backward ? 4 : tuning.forwardChannels, batch: batch, length: length,
                        heads: heads).chunkBlocks
    }

    /// The work split of a kernel with `channels` channels per thread.
    private func plan(_ kernel: CUDAContext.Function, channels: Int, batch: Int, length: Int, heads: Int) throws -> ChunkPlan {
        let resident = tuning.chunkBlocks == nil ? try context.residentBlocks(kernel, threadsPerBlock: threadsPerBlock) : 0
        return ChunkPlan(batch: batch, length: length, blockLength: blockLength, lanesPerRow: heads * (D / channels),
                         threadsPerBlock: threadsPerBlock, chunkBlocks: tuning.chunkBlocks,
                         residentThreads: resident * threadsPerBlock * context.multiprocessorCount)
    }

    private func arguments(batch: Int, length: Int, _ shape: Shape, _ plan: ChunkPlan) -> [CUDAContext.Argument] {
        [.int32(Int32(batch)), .int32(Int32(length)), .int32(Int32(shape.heads)), .int32(Int32(shape.kvHeads)),
         .int64(Int64(shape.stride)), .float32(shape.gateScale), .int32(Int32(plan.chunkBlocks))]
    }

    private func check(_ buffer: DeviceBuffer, _ count: Int, _ format: NumberFormat, _ label: String) {
        require(buffer.context === context, "CUDAPhalanxKernels.\(label) belongs to another CUDAContext")
        require(buffer.byteCount >= count * format.byteCount,
                "CUDAPhalanxKernels.\(label) holds \(buffer.byteCount) bytes, expected \(count) \(format) numbers")
        require(count <= Int(Int32.max) * D, "CUDAPhalanxKernels.\(label): \(count) numbers exceed the kernels' sizes")
    }
}

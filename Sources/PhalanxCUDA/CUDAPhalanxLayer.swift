import PhalanxLayers
import PhalanxRuntime
import SWR

/// `PhalanxLayer.headDim`, short for the layouts below.
private let D = PhalanxLayer.headDim

/// The Phalanx token mixer (SWR.md section 6) on a CUDA device: the CPU `PhalanxLayer`'s
/// parameters, names and results, as three steps per direction.
///
///     z     = x W_in^T                      [rows, P]    cuBLAS; W_in = proj_b | proj_c | proj_v | proj_a
///     mixed = phalanx_forward(z + bias)     [rows, H*16] ONE kernel: a = gateScale * sigmoid(z_a),
///                                                         b = sigmoid(z_b), c = z_c, v = z_v,
///                                                         s = SWR_jagged(a, b * v) (block l, k = 2),
///                                                         mixed = s * c + v
///     y     = mixed W_out^T                 [rows, dim]  cuBLAS
///
/// Backward, adding into the float32 gradients:
///
///     dmixed = dy W_out;   dW_out += dy^T mixed                          cuBLAS
///     dz     = phalanx_backward(z, dmixed); dbias += 1^T dz              ONE kernel (+ a group sum when KVH < H)
///     dW_in += dz^T x;   dx = dz W_in                                    cuBLAS
///
/// The kernels recompute gates, `b * v` and `s` from `z` instead of storing them, so forward keeps
/// only `z`, `mixed` and each block's carrier (1/l of a row per head, `l` the block length) for backward (see
/// `Kernels/phalanx_layer.cu`). The bias gradient is summed inside the backward kernel with
/// float32 atomics, so its last bits vary from run to run.
///
/// Layouts (row-major; rows = batch * length, sequence by sequence): `x`, `y`, `dx`, `dy`
/// `[rows, dim]`; `z` and `dz` `[rows, stride]` with columns `b [KVH*16] | c [KVH*16] | v [H*16] |
/// a [H]` then padding (`PhalanxLayer.Columns`, the CPU layer's order). Activations and weights are stored in `storage` (float32 or
/// bfloat16); arithmetic and accumulation are float32; biases and every gradient of a parameter
/// are float32.
///
/// Not thread-safe: one caller at a time.
///
///     let gpu = try CUDAPhalanxLayer(copying: layer, context: try CUDAContext.shared.get(), storage: .bfloat16)
///     let x = try gpu.storage.upload(input, context: gpu.context)        // [batch * length * dim]
///     let (y, cache) = try gpu.forward(x, batch: batch, length: length)
///     let dx = try gpu.backward(try gpu.storage.upload(outputGradient, context: gpu.context), cache: cache)
///     let gradients = try gpu.gradients()                                 // by checkpoint name, float32
public final class CUDAPhalanxLayer: @unchecked Sendable {
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

    /// What backward needs from one forward call.
    public struct Cache {
        /// `x` `[rows, dim]` in `storage`, the input projection's input.
        public let input: DeviceBuffer
        /// Sequences, and positions per sequence, of the call.
        public let batch: Int, length: Int
        /// `z` `[rows, stride]`, without bias.
        public let projections: DeviceBuffer
        /// `s * c + v` `[rows, H*16]`.
        public let mixed: DeviceBuffer
        /// Each block's terminal local state `[batch, ceil(length / blockLength), H, 16]` float32.
        public let carriers: DeviceBuffer
    }

    /// The CPU layer's configuration: width, heads, gate scale, window.
    public let configuration: PhalanxLayer.Configuration
    /// How activations and weights store their numbers; biases and gradients are float32 whatever it is.
    public let storage: NumberFormat
    /// The GPU every call runs on, on its stream.
    public let context: CUDAContext
    /// The cuBLAS handle for the three matrix products of each direction.
    public let blas: CUBLAS
    /// Where each projection sits in `z` and `dz` (the CPU layer's order, padded to `stride`).
    public let columns: PhalanxLayer.Columns
    /// `[P, dim]` in `storage`, rows in `Columns` order.
    public let inputWeight: DeviceBuffer
    /// `[P]` float32 in `Columns` order (the `v` part is zero: proj_v has no bias).
    public let bias: DeviceBuffer
    /// proj_out `[dim, dim]` (out, in) in `storage`.
    public let outputWeight: DeviceBuffer
    /// float32 gradients of `inputWeight`, `bias` and `outputWeight`, same layouts.
    public let inputWeightGradient: DeviceBuffer, biasGradient: DeviceBuffer, outputWeightGradient: DeviceBuffer
    /// The kernel variants and work split (see `Tuning`).
    public var tuning = Tuning() {
        didSet {
            require((tuning.chunkBlocks ?? 1) >= 1, "CUDAPhalanxLayer: chunkBlocks must be at least 1, got \(tuning.chunkBlocks!)")
            for name in ["phalanx_forward_\(storage)_\(tuning.forwardSuffix)", "phalanx_backward_\(storage)_\(tuning.backwardSuffix)"] {
                require(kernels[name] != nil,
                        "CUDAPhalanxLayer: no kernel \(name) for \(tuning); available: \(kernels.keys.sorted().joined(separator: ", "))")
            }
        }
    }
    /// The block lengths the kernels compile for: multiples of 8 (rows load in groups of up to 8)
    /// up to 16 (a block's gates and values fill the backward kernel's shared memory).
    public static let blockLengths = [8, 16]
    /// Threads per thread block of the kernels.
    public let threadsPerBlock = 128

    /// The CPU layer's parameter names, in its order: proj_a, its bias, proj_b, its bias, proj_c,
    /// its bias, proj_v, proj_out.
    let names: [String]
    private let kernels: [String: CUDAContext.Function]

    /// A GPU copy of `layer`'s parameters (rounded to bfloat16 when `storage` is), with zero
    /// gradients; compiles the kernels (once per context).
    ///
    /// - Throws: `CUDAUnavailable` without NVRTC, cuBLAS or the kernel sources; `NVRTCError`,
    ///   `CUDAError`, `CUBLASError`.
    public init(copying layer: PhalanxLayer, context: CUDAContext, storage: NumberFormat,
                blas: CUBLAS? = nil) throws {
        let configuration = layer.configuration
        require(Self.blockLengths.contains(configuration.blockLength),
                "CUDAPhalanxLayer: the kernels take block lengths \(Self.blockLengths), the layer has \(configuration.blockLength)")
        require(configuration.blocksSeen == 2, "CUDAPhalanxLayer: the kernels compute k = 2 (blocksSeen), the layer has \(configuration.blocksSeen)")
        self.configuration = configuration
        self.storage = storage
        self.context = context
        self.blas = try blas ?? CUBLAS(context: context)
        let dim = configuration.dim, H = configuration.heads
        let columns = PhalanxLayer.Columns(configuration)
        self.columns = columns
        let weight = layer.projB.value.array + layer.projC.value.array + layer.projV.value.array + layer.projA.value.array
        inputWeight = try storage.upload(weight, context: context)
        bias = try DeviceBuffer(context: context, floats: layer.projBBias.value.array + layer.projCBias.value.array
                                + [Float](repeating: 0, count: H * D) + layer.projABias.value.array)
        outputWeight = try storage.upload(layer.projOut.weight.value.array, context: context)
        inputWeightGradient = try DeviceBuffer(context: context, byteCount: columns.width * dim * 4)
        biasGradient = try DeviceBuffer(context: context, byteCount: columns.width * 4)
        outputWeightGradient = try DeviceBuffer(context: context, byteCount: dim * dim * 4)
        names = [layer.projA, layer.projABias, layer.projB, layer.projBBias, layer.projC, layer.projCBias, layer.projV,
                 layer.projOut.weight].map(\.name)
        let type = storage.description
        let kernelNames = Tuning.forwardVariants.map { "phalanx_forward_\(type)_v\($0.0)_r\($0.1)" }
            + Tuning.backwardVariants.map { "phalanx_backward_\(type)_v4_s\($0)" } + ["phalanx_group_sum_\(type)"]
        let source = try KernelSources.source(named: "jagged_window") + "\n" + KernelSources.source(named: "phalanx_layer")
        let functions = try context.functions(kernelNames, source: source, sourceName: "phalanx_layer.cu",
                                              options: KernelSources.definitions(blockLength: configuration.blockLength))
        kernels = Dictionary(uniqueKeysWithValues: zip(kernelNames, functions))
        try zeroGradients()
    }


    /// Sets every gradient to zero (queued).
    public func zeroGradients() throws {
        for gradient in [inputWeightGradient, biasGradient, outputWeightGradient] { try gradient.fill(byte: 0) }
    }

    /// `y` `[batch, length, dim]` for `x` `[batch, length, dim]` (both in `storage`), every sequence
    /// from its start; queued on the context's stream.
    public func forward(_ x: DeviceBuffer, batch: Int, length: Int) throws -> (DeviceBuffer, Cache) {
        let dim = configuration.dim, rows = batch * length
        check(x, rows * dim, "forward: x")
        let z = try DeviceBuffer(context: context, byteCount: rows * columns.stride * storage.byteCount)
        let y = try DeviceBuffer(context: context, byteCount: rows * dim * storage.byteCount)
        if rows > 0 { try multiply(.z, rows: rows, x, into: z) }
        let (mixed, carriers) = try forwardElementwise(z, batch: batch, length: length)
        if rows > 0 { try multiply(.y, rows: rows, mixed, into: y) }
        return (y, Cache(input: x, batch: batch, length: length, projections: z, mixed: mixed, carriers: carriers))
    }

    /// Runs `product` over `rows` rows (queued): `a` is its row operand (`x`, `mixed`, `dy` or
    /// `dz` as the product names it), `b` the second activation of the weight gradients (`mixed`
    /// for `dW_out`, `x` for `dW_in`), `out` its result (ignored for the weight gradients, which
    /// add into this layer's gradient buffers). `blas` defaults to the layer's own.
    public func multiply(_ product: PhalanxLayer.Product, rows: Int, _ a: DeviceBuffer, _ b: DeviceBuffer? = nil,
                         into out: DeviceBuffer? = nil, blas: CUBLAS? = nil) throws {
        let blas = blas ?? self.blas, dim = configuration.dim, width = configuration.heads * D
        let rowsOf = { (buffer: DeviceBuffer, columns: Int) in CUBLAS.Matrix(buffer, self.storage, rows: rows, columns: columns) }
        let z = { (buffer: DeviceBuffer) in
            CUBLAS.Matrix(buffer, self.storage, rows: rows, columns: self.columns.width, stride: self.columns.stride)
        }
        let inputWeight = CUBLAS.Matrix(self.inputWeight, storage, rows: columns.width, columns: dim)
        let outputWeight = CUBLAS.Matrix(self.outputWeight, storage, rows: dim, columns: dim)
        func result() -> DeviceBuffer {
            require(out != nil, "CUDAPhalanxLayer.multiply(\(product)): needs an output buffer")
            return out!
        }
        func second() -> DeviceBuffer {
            require(b != nil, "CUDAPhalanxLayer.multiply(\(product)): needs its second activation")
            return b!
        }
        switch product {
        case .z: try blas.gemm(rowsOf(a, dim), inputWeight, transposeB: true, into: z(result()))
        case .y: try blas.gemm(rowsOf(a, width), outputWeight, transposeB: true, into: rowsOf(result(), dim))
        case .dMixed: try blas.gemm(rowsOf(a, dim), outputWeight, into: rowsOf(result(), width))
        case .dOutputWeight:
            try blas.gemm(rowsOf(a, dim), transposeA: true, rowsOf(second(), width),
                          into: .init(outputWeightGradient, .float32, rows: dim, columns: dim), beta: 1)
        case .dInputWeight:
            try blas.gemm(z(a), transposeA: true, rowsOf(second(), dim),
                          into: .init(inputWeightGradient, .float32, rows: columns.width, columns: dim), beta: 1)
        case .dx: try blas.gemm(z(a), inputWeight, into: rowsOf(result(), dim))
        }
    }

    /// The forward kernel alone: `mixed` `[rows, H*16]` and the carriers from `z` (`[rows, stride]`,
    /// without bias), queued.
    public func forwardElementwise(_ z: DeviceBuffer, batch: Int, length: Int) throws -> (mixed: DeviceBuffer, carriers: DeviceBuffer) {
        let rows = batch * length, H = configuration.heads
        check(z, rows * columns.stride, "forwardElementwise: z")
        let mixed = try DeviceBuffer(context: context, byteCount: rows * H * D * storage.byteCount)
        let blocks = (length + configuration.blockLength - 1) / configuration.blockLength
        let carriers = try DeviceBuffer(context: context, byteCount: batch * blocks * H * PhalanxLayer.headDim * 4)
        guard rows > 0 else { return (mixed, carriers) }
        let kernel = kernels["phalanx_forward_\(storage)_\(tuning.forwardSuffix)"]!
        let plan = try self.plan(kernel, channels: tuning.forwardChannels, batch: batch, length: length)
        try context.launch(kernel, grid: (plan.gridBlocks, 1, 1), block: (threadsPerBlock, 1, 1), arguments: [
            .buffer(z), .buffer(bias), .buffer(mixed), .buffer(carriers)] + shapeArguments(batch: batch, length: length, plan: plan))
        return (mixed, carriers)
    }

    /// Adds every parameter gradient for the output gradient `dy` `[batch, length, dim]` (in
    /// `storage`) to the float32 gradient buffers and returns `dx`; queued on the context's stream.
    public func backward(_ dy: DeviceBuffer, cache: Cache) throws -> DeviceBuffer {
        let dim = configuration.dim, rows = cache.batch * cache.length, width = configuration.heads * D
        check(dy, rows * dim, "backward: dy")
        let dx = try DeviceBuffer(context: context, byteCount: rows * dim * storage.byteCount)
        guard rows > 0 else { return dx }
        let dMixed = try DeviceBuffer(context: context, byteCount: rows * width * storage.byteCount)
        try multiply(.dMixed, rows: rows, dy, into: dMixed)
        try multiply(.dOutputWeight, rows: rows, dy, cache.mixed)
        let dz = try backwardElementwise(dMixed, cache: cache)
        try multiply(.dInputWeight, rows: rows, dz, cache.input)
        try multiply(.dx, rows: rows, dz, into: dx)
        return dx
    }

    /// The backward kernel alone (and the group sums when KVH < H): `dz` `[rows, stride]` for
    /// `dmixed` `[rows, H*16]`, adding the bias gradient; queued.
    public func backwardElementwise(_ dMixed: DeviceBuffer, cache: Cache) throws -> DeviceBuffer {
        let H = configuration.heads, KVH = configuration.kvHeads
        let rows = cache.batch * cache.length, width = H * D
        check(dMixed, rows * width, "backwardElementwise: dmixed")
        let dz = try DeviceBuffer(context: context, byteCount: rows * columns.stride * storage.byteCount)
        guard rows > 0 else { return dz }
        // Per-head dz_b and dz_c terms: dz's own columns when every head has its kv head, else scratch.
        let scratch = KVH == H ? nil : (b: try DeviceBuffer(context: context, byteCount: rows * width * storage.byteCount),
                                        c: try DeviceBuffer(context: context, byteCount: rows * width * storage.byteCount))
        let headTargets: [CUDAContext.Argument] = scratch.map {
            [.buffer($0.b), .int64(0), .buffer($0.c), .int64(0), .int64(Int64(width))]
        } ?? [.buffer(dz), .int64(Int64(columns.b)), .buffer(dz), .int64(Int64(columns.c)), .int64(Int64(columns.stride))]
        let kernel = kernels["phalanx_backward_\(storage)_\(tuning.backwardSuffix)"]!
        let plan = try self.plan(kernel, channels: 4, batch: cache.batch, length: cache.length)
        try context.launch(kernel, grid: (plan.gridBlocks, 1, 1), block: (threadsPerBlock, 1, 1), arguments: [
            .buffer(cache.projections), .buffer(bias), .buffer(dMixed), .buffer(cache.carriers), .buffer(dz)] + headTargets
            + [.buffer(biasGradient)] + shapeArguments(batch: cache.batch, length: cache.length, plan: plan))
        if let scratch {
            let sums = rows * KVH * D
            for (source, column) in [(scratch.b, columns.b), (scratch.c, columns.c)] {
                try context.launch(kernels["phalanx_group_sum_\(storage)"]!, grid: ((sums + 255) / 256, 1, 1), block: (256, 1, 1),
                                   arguments: [
                                       .buffer(source), .buffer(dz), .int64(Int64(rows)), .int32(Int32(H)), .int32(Int32(KVH)),
                                       .int64(Int64(columns.stride)), .int32(Int32(column)),
                                   ])
            }
        }
        return dz
    }

    /// The gradients by the CPU layer's parameter names (`<name>.param.proj_a.weight`, ...), as
    /// float32 in the CPU layer's layouts; waits for the stream.
    public func gradients() throws -> [String: [Float]] {
        let dim = configuration.dim
        let weight = try inputWeightGradient.floats(), bias = try biasGradient.floats()
        func rows(_ range: Range<Int>) -> [Float] { Array(weight[(range.lowerBound * dim)..<(range.upperBound * dim)]) }
        let c = columns
        let values: [[Float]] = [
            rows(c.a..<c.width), Array(bias[c.a..<c.width]), rows(c.b..<c.c), Array(bias[c.b..<c.c]),
            rows(c.c..<c.v), Array(bias[c.c..<c.v]), rows(c.v..<c.a), try outputWeightGradient.floats(),
        ]
        return Dictionary(uniqueKeysWithValues: zip(names, values))
    }

    // MARK: Planning

    /// The chunk length in blocks that the forward (or backward) kernel uses for this shape.
    public func chunkBlocks(batch: Int, length: Int, backward: Bool) throws -> Int {
        let name = backward ? "phalanx_backward_\(storage)_\(tuning.backwardSuffix)" : "phalanx_forward_\(storage)_\(tuning.forwardSuffix)"
        return try plan(kernels[name]!, channels: backward ? 4 : tuning.forwardChannels, batch: batch, length: length).chunkBlocks
    }

    /// The work split of a kernel with `channels` channels per thread.
    private func plan(_ kernel: CUDAContext.Function, channels: Int, batch: Int, length: Int) throws -> ChunkPlan {
        let resident = tuning.chunkBlocks == nil ? try context.residentBlocks(kernel, threadsPerBlock: threadsPerBlock) : 0
        return ChunkPlan(batch: batch, length: length, blockLength: configuration.blockLength,
                         lanesPerRow: configuration.heads * (PhalanxLayer.headDim / channels),
                         threadsPerBlock: threadsPerBlock, chunkBlocks: tuning.chunkBlocks,
                         residentThreads: resident * threadsPerBlock * context.multiprocessorCount)
    }

    private func shapeArguments(batch: Int, length: Int, plan: ChunkPlan) -> [CUDAContext.Argument] {
        [.int32(Int32(batch)), .int32(Int32(length)), .int32(Int32(configuration.heads)), .int32(Int32(configuration.kvHeads)),
         .int64(Int64(columns.stride)), .float32(configuration.gateScale), .int32(Int32(plan.chunkBlocks))]
    }

    private func check(_ buffer: DeviceBuffer, _ count: Int, _ label: String) {
        require(buffer.context === context, "CUDAPhalanxLayer.\(label) belongs to another CUDAContext")
        require(buffer.byteCount >= count * storage.byteCount,
                "CUDAPhalanxLayer.\(label) holds \(buffer.byteCount) bytes, expected \(count) \(storage) numbers")
        require(count <= Int(Int32.max) * D, "CUDAPhalanxLayer.\(label): \(count) numbers exceed the kernels' sizes")
    }
}

import Foundation
import PhalanxRuntime

/// The language model's layers that are not matrix products, on a CUDA device: RMSNorm, rotary
/// embedding, the SwiGLU activation, embedding gather and its gradient, residual dropout, fused
/// cross-entropy, the global gradient norm with its clip scale, fused AdamW, and element-wise
/// helpers. Each reproduces the CPU layer named in its documentation (same formula, epsilon,
/// layout and rounding order); with cuBLAS (`CUBLAS`) and the attention and Phalanx kernels they
/// make up a whole training step. See `Kernels/layers.cu`.
///
/// Storage: activations (inputs, outputs and their gradients) in `storage`, float32 or bfloat16,
/// with float32 arithmetic; weights, optimizer state and every parameter gradient float32.
/// Buffers are `DeviceBuffer`s with an element offset where a caller may want a slice; each call
/// checks that its buffers hold what the shapes need and stops with a message naming the
/// function and the buffer otherwise. Every call is queued on the context's stream (no host wait).
///
/// Deterministic: no atomics. Reductions (RMSNorm's weight gradient, the cross-entropy row sums
/// and mean, the gradient norm) run in an order fixed by the shapes alone, so two runs, and a
/// resumed run, give the same bits on any device.
public struct CUDALayerKernels: Sendable {
    /// The GPU every call runs on, on its stream.
    public let context: CUDAContext
    /// How activations are stored; arithmetic is float32 either way.
    public let storage: NumberFormat
    private let functions: [String: CUDAContext.Function]

    /// Thread blocks of the element-wise kernels, and their most blocks (they stride over the rest).
    static let threadsPerBlock = 256, maximumBlocks = 8192
    /// RMSNorm backward's most thread blocks: its weight gradient has one float32 partial row per
    /// block, added in order by a second kernel.
    public static let maximumPartialRows = 1024
    /// Gradient numbers per partial sum of the gradient norm (one thread block each).
    public static let normChunk = 65536

    /// Compiles (once per context: every storage shares one module) and loads the kernels.
    ///
    /// - Throws: `CUDAUnavailable` without NVRTC or the kernel source; `NVRTCError`/`CUDAError`
    ///   when compiling or loading fails.
    public init(context: CUDAContext, storage: NumberFormat = .float32) throws {
        self.context = context
        self.storage = storage
        var names = ["rmsnorm_weight_grad", "mean_loss", "sum_squares", "clip_state", "adamw_vec", "adamw_scalar",
                     "cross_entropy_f32", "cross_entropy_bf16"]
        for format in NumberFormat.allCases {
            for path in ["vec", "scalar"] {
                names += ["rmsnorm_forward", "rmsnorm_backward", "rope", "swiglu_forward", "swiglu_backward", "embedding_forward",
                          "embedding_backward", "dropout", "fill", "scale"].map { "\($0)_\(format)_\(path)" }
                for other in NumberFormat.allCases { names += ["add", "convert"].map { "\($0)_\(format)_\(other)_\(path)" } }
            }
        }
        let loaded = try context.functions(names, source: try KernelSources.source(named: "layers"), sourceName: "layers.cu")
        functions = Dictionary(uniqueKeysWithValues: zip(names, loaded))
    }

    // MARK: RMSNorm

    /// RMSNorm forward (`PhalanxLayers.RMSNorm.forward`), queued:
    ///
    ///     y[r, :] = x[r, :] * (1 / sqrt(mean(x[r, :]^2) + eps)) * w
    ///
    /// - Parameters:
    ///   - x: `[rows, dim]` in `storage`, from element `xOffset`.
    ///   - weight: `w` `[dim]` float32.
    ///   - output: `y` `[rows, dim]` in `storage`, from element `outputOffset`; must not overlap `x`.
    ///   - dim: at most 32768 (a group of up to 1024 threads per row, 32 numbers each in registers).
    ///
    /// One group of threads per row reads the row once into registers and writes it once.
    public func rmsNormForward(x: DeviceBuffer, xOffset: Int = 0, weight: DeviceBuffer, output: DeviceBuffer, outputOffset: Int = 0,
                               rows: Int, dim: Int, eps: Float = 1e-5) throws {
        let name = "CUDALayerKernels.rmsNormForward"
        check(name, "x", x, xOffset, rows * dim, storage)
        check(name, "weight", weight, 0, dim, .float32)
        check(name, "output", output, outputOffset, rows * dim, storage)
        guard rows > 0 else { return }
        let plan = rowPlan(name, dim: dim, pointers: [address(x, xOffset, storage), weight.address, address(output, outputOffset, storage)])
        try context.launch(function("rmsnorm_forward", plan.path), grid: (min(plan.tiles(rows), 65535), 1, 1), block: (plan.block, 1, 1),
                           arguments: [pointer(x, xOffset, storage), .buffer(weight), pointer(output, outputOffset, storage),
                                       .int32(Int32(rows)), .int32(Int32(dim)), .float32(eps), .int32(Int32(plan.group))])
    }

    /// RMSNorm backward (`PhalanxLayers.RMSNorm.backward`), queued: with `r = 1/sqrt(mean(x^2) + eps)`,
    /// `xhat = x r`, `g = dy w`,
    ///
    ///     dx = r * (g - xhat * mean(g * xhat)),   dw += sum over rows of dy * xhat
    ///
    /// - Parameters:
    ///   - inputGradient: `dx` `[rows, dim]` in `storage` (overwritten; must not overlap `x` or `outputGradient`).
    ///   - weightGradient: `dw` `[dim]` float32, added into.
    ///
    /// `dw` is deterministic: each thread block sums its rows in order into one partial row
    /// (at most `maximumPartialRows` blocks, fixed by `rows` and `dim`), and a second kernel adds
    /// the partial rows in block order.
    public func rmsNormBackward(x: DeviceBuffer, xOffset: Int = 0, weight: DeviceBuffer, outputGradient: DeviceBuffer,
                                outputGradientOffset: Int = 0, inputGradient: DeviceBuffer, inputGradientOffset: Int = 0,
                                weightGradient: DeviceBuffer, rows: Int, dim: Int, eps: Float = 1e-5) throws {
        let name = "CUDALayerKernels.rmsNormBackward"
        check(name, "x", x, xOffset, rows * dim, storage)
        check(name, "weight", weight, 0, dim, .float32)
        check(name, "outputGradient", outputGradient, outputGradientOffset, rows * dim, storage)
        check(name, "inputGradient", inputGradient, inputGradientOffset, rows * dim, storage)
        check(name, "weightGradient", weightGradient, 0, dim, .float32)
        guard rows > 0 else { return }
        let plan = rowPlan(name, dim: dim, pointers: [address(x, xOffset, storage), weight.address,
                                                      address(outputGradient, outputGradientOffset, storage),
                                                      address(inputGradient, inputGradientOffset, storage)])
        let blocks = min(plan.tiles(rows), Self.maximumPartialRows)
        let partial = try DeviceBuffer(context: context, byteCount: blocks * dim * 4)
        try context.launch(function("rmsnorm_backward", plan.path), grid: (blocks, 1, 1), block: (plan.block, 1, 1),
                           arguments: [pointer(x, xOffset, storage), .buffer(weight), pointer(outputGradient, outputGradientOffset, storage),
                                       pointer(inputGradient, inputGradientOffset, storage), .buffer(partial),
                                       .int32(Int32(rows)), .int32(Int32(dim)), .float32(eps), .int32(Int32(plan.group))])
        try context.launch(functions["rmsnorm_weight_grad"]!, grid: ((dim + 255) / 256, 1, 1), block: (256, 1, 1),
                           arguments: [.buffer(partial), .buffer(weightGradient), .int32(Int32(blocks)), .int32(Int32(dim))])
    }

    /// How a row kernel (RMSNorm) covers rows of `dim`: 16-byte units when every row starts
    /// 16-byte aligned, else single numbers; a group of `group` threads per row (a power of two up
    /// to 256, else a multiple of 32 up to 1024) owning at most 32 numbers each; thread blocks of
    /// `block` threads holding `block / group` rows at a time.
    private struct RowPlan {
        let path: String, group: Int, block: Int
        func tiles(_ rows: Int) -> Int { (rows + block / group - 1) / (block / group) }
    }

    private func rowPlan(_ name: String, dim: Int, pointers: [UInt64]) -> RowPlan {
        let vector = 16 / storage.byteCount
        let vectorized = dim % vector == 0 && pointers.allSatisfy { $0 % 16 == 0 }
        let unit = vectorized ? vector : 1
        let units = dim / unit, perThread = 32 / unit
        var group = max(32, (units + perThread - 1) / perThread)
        group = group <= 256 ? 1 << (Int.bitWidth - (group - 1).leadingZeroBitCount) : (group + 31) / 32 * 32
        require(group <= 1024, "\(name): dim \(dim) exceeds the largest row of the kernels (\(1024 * perThread * unit) numbers)")
        require(dim <= Int(Int32.max), "\(name): dim \(dim) must fit 32 bits")
        return RowPlan(path: vectorized ? "vec" : "scalar", group: group, block: max(group, 256))
    }

    // MARK: Rotary embedding

    /// The cos and sin of every angle of a rotary embedding, `[positions, headDim/2]` float32
    /// each, on the device: the host's table (`PhalanxLayers.RotaryEmbedding.angles`, computed in
    /// double precision, then rounded), so the rotations round as the CPU's.
    public struct RotaryTable: Sendable {
        /// Channels per head.
        public let headDim: Int
        /// Positions covered: `0..<positions`.
        public let positions: Int
        /// `cos(p * base^(-2i/headDim))`, `sin(...)`, `[positions, headDim/2]`.
        public let cosines: DeviceBuffer, sines: DeviceBuffer
    }

    /// Uploads a rotary table for heads of `headDim` (even): `cosines` and `sines` `[positions,
    /// headDim/2]`, covering positions `0..<positions` (decoding at position `p` needs `p + 1`).
    /// Waits for the stream.
    public func rotaryTable(headDim: Int, cosines: [Float], sines: [Float]) throws -> RotaryTable {
        require(headDim >= 2 && headDim % 2 == 0, "CUDALayerKernels.rotaryTable: headDim must be even, got \(headDim)")
        let half = headDim / 2, positions = cosines.count / half
        require(cosines.count == sines.count && cosines.count == positions * half && positions <= Int(Int32.max),
                "CUDALayerKernels.rotaryTable: \(cosines.count) cosines and \(sines.count) sines are not [positions, \(half)]")
        return RotaryTable(headDim: headDim, positions: positions,
                           cosines: try DeviceBuffer(context: context, floats: cosines),
                           sines: try DeviceBuffer(context: context, floats: sines))
    }

    /// Rotates `x` `[batch, length, heads, headDim]` in place (`PhalanxLayers.RotaryEmbedding.rotate`):
    /// channel `i` is paired with `i + headDim/2`; the row at position `p = startPosition + (row % length)`
    /// (positions restart at every sequence) turns by `theta = p * base^(-2i/headDim)`:
    ///
    ///     y[i] = x[i] cos - x[i + h] sin,   y[i + h] = x[i + h] cos + x[i] sin     (h = headDim/2)
    ///
    /// `inverse` turns by `-theta` (backward). The table must cover `startPosition + length` positions.
    public func rotate(_ x: DeviceBuffer, offset: Int = 0, table: RotaryTable, batch: Int, length: Int, heads: Int,
                       startPosition: Int = 0, inverse: Bool) throws {
        let name = "CUDALayerKernels.rotate"
        require(batch >= 0 && length >= 0 && heads >= 0 && startPosition >= 0, "\(name): negative shape or start")
        check(name, "x", x, offset, batch * length * heads * table.headDim, storage)
        require(startPosition + length <= table.positions,
                "\(name): positions up to \(startPosition + length) need a table of that many, it has \(table.positions)")
        let rows = batch * length, half = table.headDim / 2
        guard rows > 0, heads > 0 else { return }
        let width = storage == .float32 ? 4 : 8
        let vectorized = half % width == 0 && address(x, offset, storage) % 16 == 0
        let units = rows * heads * (half / (vectorized ? width : 1))
        try context.launch(function("rope", vectorized ? "vec" : "scalar"), grid: blocks(units), block: (Self.threadsPerBlock, 1, 1),
                           arguments: [pointer(x, offset, storage), .buffer(table.cosines), .buffer(table.sines), .int64(Int64(rows)),
                                       .int32(Int32(length)), .int32(Int32(heads)), .int32(Int32(table.headDim)),
                                       .int32(Int32(startPosition)), .int32(inverse ? 1 : 0)])
    }

    // MARK: SwiGLU

    /// The element-wise part of SwiGLU forward (`PhalanxLayers.SwiGLU.forward`; the three
    /// projections are cuBLAS products), queued:
    ///
    ///     h = (g * sigmoid(g)) * u          g = gate(x), u = up(x)
    ///
    /// `gate` and `up` are `[rows, columns]` with rows `inputRowStride` numbers apart (`columns`
    /// by default): two buffers as the CPU keeps them, or the two halves of one fused product
    /// `[rows, 2 * columns]` (`up` = the same buffer at `upOffset: columns`, stride `2 * columns`).
    /// `hidden` `[rows, columns]`, rows `hiddenRowStride` apart (`columns` by default).
    public func swiGLUForward(gate: DeviceBuffer, gateOffset: Int = 0, up: DeviceBuffer, upOffset: Int = 0, inputRowStride: Int? = nil,
                              hidden: DeviceBuffer, hiddenOffset: Int = 0, hiddenRowStride: Int? = nil,
                              rows: Int, columns: Int) throws {
        let name = "CUDALayerKernels.swiGLUForward"
        let ldIn = inputRowStride ?? columns, ldOut = hiddenRowStride ?? columns
        require(ldIn >= columns && ldOut >= columns && columns >= 0 && rows >= 0, "\(name): row strides must be at least columns (\(columns))")
        let span = rows == 0 ? 0 : (rows - 1) * ldIn + columns
        check(name, "gate", gate, gateOffset, span, storage)
        check(name, "up", up, upOffset, span, storage)
        check(name, "hidden", hidden, hiddenOffset, rows == 0 ? 0 : (rows - 1) * ldOut + columns, storage)
        guard rows > 0, columns > 0 else { return }
        let vectorized = [columns, ldIn, ldOut].allSatisfy { $0 % 8 == 0 }
            && [address(gate, gateOffset, storage), address(up, upOffset, storage), address(hidden, hiddenOffset, storage)].allSatisfy { $0 % 16 == 0 }
        try context.launch(function("swiglu_forward", vectorized ? "vec" : "scalar"), grid: blocks(rows * columns / (vectorized ? 8 : 1)),
                           block: (Self.threadsPerBlock, 1, 1),
                           arguments: [pointer(gate, gateOffset, storage), pointer(up, upOffset, storage), .int64(Int64(ldIn)),
                                       pointer(hidden, hiddenOffset, storage), .int64(Int64(ldOut)), .int64(Int64(rows)),
                                       .int32(Int32(columns))])
    }

    /// The element-wise part of SwiGLU backward (`PhalanxLayers.SwiGLU.backward`), queued: with
    /// `s = sigmoid(g)` and `dh` the gradient of `h` (the `down_proj` input gradient),
    ///
    ///     du = (dh * g) * s,   dg = ((dh * u) * s) * (1 + g * (1 - s))
    ///
    /// `gateGradient` and `upGradient` share `gradientRowStride` (`columns` by default): two
    /// buffers, or the halves of one `[rows, 2 * columns]` buffer for one fused `dx` product.
    /// `gateGradient` may be `hiddenGradient` itself (as the CPU reuses `dh`).
    public func swiGLUBackward(gate: DeviceBuffer, gateOffset: Int = 0, up: DeviceBuffer, upOffset: Int = 0, inputRowStride: Int? = nil,
                               hiddenGradient: DeviceBuffer, hiddenGradientOffset: Int = 0, hiddenGradientRowStride: Int? = nil,
                               gateGradient: DeviceBuffer, gateGradientOffset: Int = 0, upGradient: DeviceBuffer, upGradientOffset: Int = 0,
                               gradientRowStride: Int? = nil, rows: Int, columns: Int) throws {
        let name = "CUDALayerKernels.swiGLUBackward"
        let ldIn = inputRowStride ?? columns, ldDh = hiddenGradientRowStride ?? columns, ldOut = gradientRowStride ?? columns
        require([ldIn, ldDh, ldOut].allSatisfy { $0 >= columns } && columns >= 0 && rows >= 0,
                "\(name): row strides must be at least columns (\(columns))")
        func span(_ ld: Int) -> Int { rows == 0 ? 0 : (rows - 1) * ld + columns }
        check(name, "gate", gate, gateOffset, span(ldIn), storage)
        check(name, "up", up, upOffset, span(ldIn), storage)
        check(name, "hiddenGradient", hiddenGradient, hiddenGradientOffset, span(ldDh), storage)
        check(name, "gateGradient", gateGradient, gateGradientOffset, span(ldOut), storage)
        check(name, "upGradient", upGradient, upGradientOffset, span(ldOut), storage)
        guard rows > 0, columns > 0 else { return }
        let addresses = [address(gate, gateOffset, storage), address(up, upOffset, storage),
                         address(hiddenGradient, hiddenGradientOffset, storage), address(gateGradient, gateGradientOffset, storage),
                         address(upGradient, upGradientOffset, storage)]
        let vectorized = [columns, ldIn, ldDh, ldOut].allSatisfy { $0 % 8 == 0 } && addresses.allSatisfy { $0 % 16 == 0 }
        try context.launch(function("swiglu_backward", vectorized ? "vec" : "scalar"), grid: blocks(rows * columns / (vectorized ? 8 : 1)),
                           block: (Self.threadsPerBlock, 1, 1),
                           arguments: [pointer(gate, gateOffset, storage), pointer(up, upOffset, storage), .int64(Int64(ldIn)),
                                       pointer(hiddenGradient, hiddenGradientOffset, storage), .int64(Int64(ldDh)),
                                       pointer(gateGradient, gateGradientOffset, storage), pointer(upGradient, upGradientOffset, storage),
                                       .int64(Int64(ldOut)), .int64(Int64(rows)), .int32(Int32(columns))])
    }

    // MARK: Embedding

    /// Embedding forward (`PhalanxLayers.Embedding.forward`), queued: `y[r, :] = W[tokens[r], :]`.
    ///
    /// - Parameters:
    ///   - tokens: `[rows]` int32; a token outside `0..<vocabulary` gives a row of NaN (the host,
    ///     which knows the tokens, should refuse them first).
    ///   - table: `W` `[vocabulary, dim]` float32.
    ///   - output: `y` `[rows, dim]` in `storage`.
    public func embeddingForward(tokens: DeviceBuffer, table: DeviceBuffer, output: DeviceBuffer, outputOffset: Int = 0,
                                 rows: Int, dim: Int, vocabulary: Int) throws {
        let name = "CUDALayerKernels.embeddingForward"
        require(tokens.byteCount >= rows * 4, "\(name): tokens hold \(tokens.byteCount) bytes, expected \(rows) int32")
        require(vocabulary <= Int(Int32.max), "\(name): vocabulary \(vocabulary) must fit int32")
        check(name, "table", table, 0, vocabulary * dim, .float32)
        check(name, "output", output, outputOffset, rows * dim, storage)
        guard rows > 0, dim > 0 else { return }
        let vectorized = dim % 8 == 0 && table.address % 16 == 0 && address(output, outputOffset, storage) % 16 == 0
        try context.launch(function("embedding_forward", vectorized ? "vec" : "scalar"), grid: blocks(rows * dim / (vectorized ? 8 : 1)),
                           block: (Self.threadsPerBlock, 1, 1),
                           arguments: [.buffer(tokens), .buffer(table), pointer(output, outputOffset, storage), .int64(Int64(rows)),
                                       .int32(Int32(dim)), .int32(Int32(vocabulary))])
    }

    /// Which positions use each token, for the deterministic embedding gradient: the tokens used
    /// (ascending), and for the k-th of them its positions `positions[offsets[k] ..< offsets[k+1]]`
    /// in ascending order (CSR), uploaded.
    public struct EmbeddingGradientPlan: Sendable {
        /// Positions (rows of the gradient) the plan covers.
        public let rows: Int
        /// Distinct tokens used.
        public let usedTokens: Int
        /// `[usedTokens]`, `[usedTokens + 1]`, `[rows]` int32.
        public let tokens: DeviceBuffer, offsets: DeviceBuffer, positions: DeviceBuffer
    }

    /// Builds (counting sort, `O(rows + vocabulary)`) and uploads the plan of `tokens`; waits for the stream.
    public func embeddingGradientPlan(tokens: [Int32], vocabulary: Int) throws -> EmbeddingGradientPlan {
        var counts = [Int32](repeating: 0, count: vocabulary + 1)
        for (i, t) in tokens.enumerated() {
            require(t >= 0 && Int(t) < vocabulary, "CUDALayerKernels.embeddingGradientPlan: token \(t) at position \(i) is outside 0..<\(vocabulary)")
            counts[Int(t)] += 1
        }
        var used: [Int32] = [], offsets: [Int32] = [0], start = [Int32](repeating: 0, count: vocabulary)
        for t in 0..<vocabulary where counts[t] > 0 {
            start[t] = offsets.last!
            used.append(Int32(t))
            offsets.append(offsets.last! + counts[t])
        }
        var positions = [Int32](repeating: 0, count: tokens.count)
        for (i, t) in tokens.enumerated() {
            positions[Int(start[Int(t)])] = Int32(i)
            start[Int(t)] += 1
        }
        return EmbeddingGradientPlan(rows: tokens.count, usedTokens: used.count,
                                     tokens: try DeviceBuffer(context: context, byteCount: used.count * 4).with(used),
                                     offsets: try DeviceBuffer(context: context, byteCount: offsets.count * 4).with(offsets),
                                     positions: try DeviceBuffer(context: context, byteCount: positions.count * 4).with(positions))
    }

    /// Embedding backward (`PhalanxLayers.Embedding.backward`), queued: for each used token `t`,
    /// `dW[t, :] += dy[p, :]` for its positions `p` in ascending order, one addition at a time
    /// onto `dW` exactly as the CPU loop does (bit-identical in float32 storage); no atomics.
    ///
    /// - Parameters:
    ///   - outputGradient: `dy` `[plan.rows, dim]` in `storage`.
    ///   - weightGradient: `dW` `[vocabulary, dim]` float32, added into.
    public func embeddingBackward(plan: EmbeddingGradientPlan, outputGradient: DeviceBuffer, outputGradientOffset: Int = 0,
                                  weightGradient: DeviceBuffer, dim: Int) throws {
        let name = "CUDALayerKernels.embeddingBackward"
        check(name, "outputGradient", outputGradient, outputGradientOffset, plan.rows * dim, storage)
        require(weightGradient.context === context && weightGradient.byteCount % (4 * max(dim, 1)) == 0,
                "\(name): weightGradient must be [vocabulary, \(dim)] float32 on this context, it holds \(weightGradient.byteCount) bytes")
        guard plan.usedTokens > 0, dim > 0 else { return }
        let vectorized = dim % 8 == 0 && weightGradient.address % 16 == 0 && address(outputGradient, outputGradientOffset, storage) % 16 == 0
        let tiles = (dim / (vectorized ? 8 : 1) + 127) / 128
        require(tiles <= 65535, "\(name): dim \(dim) too large")
        try context.launch(function("embedding_backward", vectorized ? "vec" : "scalar"), grid: (plan.usedTokens, tiles, 1), block: (128, 1, 1),
                           arguments: [.buffer(plan.tokens), .buffer(plan.offsets), .buffer(plan.positions),
                                       pointer(outputGradient, outputGradientOffset, storage), .buffer(weightGradient), .int32(Int32(dim))])
    }

    // MARK: Dropout

    /// Residual dropout (`PhalanxModels.Dropout.apply`), in place, queued: element `e` of the
    /// branch tensor (`elementIndex + i` for `x[offset + i]`) is kept, times `1 / (1 - rate)`,
    /// when the top 24 bits of
    ///
    ///     mix(stream + e * 0xD1B54A32D192ED03),   stream = mix(seed ^ mix(step * 0x9E3779B97F4A7C15 ^ microBatch << 48 ^ block << 8 ^ branch))
    ///
    /// (`mix` = SplitMix64's finaliser) are at least `round(rate * 2^24)`, else set to 0: the
    /// same mask bit for bit as the CPU. Backward applies the same call to the gradient.
    public func dropout(_ x: DeviceBuffer, offset: Int = 0, count: Int, rate: Float, seed: UInt64, step: Int, microBatch: Int,
                        block: Int, branch: Int, elementIndex: Int = 0) throws {
        let name = "CUDALayerKernels.dropout"
        require(rate >= 0 && rate < 1, "\(name): rate must be in [0, 1), got \(rate)")
        check(name, "x", x, offset, count, storage)
        let keepScale = 1 / (1 - rate)
        let threshold = UInt64((Double(rate) * Double(1 << 24)).rounded())
        let stream = Self.mix(seed ^ Self.mix(UInt64(step) &* 0x9E37_79B9_7F4A_7C15 ^ UInt64(microBatch) << 48
                                               ^ UInt64(block) << 8 ^ UInt64(branch)))
        try elementwise("dropout_\(storage)", count: count, pointers: [(x, offset, storage)], width: 8) { base in
            [.int64(Int64(bitPattern: stream)), .int64(Int64(bitPattern: threshold)), .float32(keepScale),
             .int64(Int64(bitPattern: UInt64(elementIndex + base)))]
        }
    }

    /// SplitMix64's finaliser, as `Dropout` mixes.
    static func mix(_ z: UInt64) -> UInt64 {
        var z = z
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    // MARK: Cross-entropy

    /// Fused cross-entropy over logits `[rows, vocabulary]` (`PhalanxModels.LanguageModel.loss`),
    /// queued: each row's loss, and the logits overwritten in place by their gradient,
    ///
    ///     rowLosses[r] = logsumexp(z[r, :]) - z[r, t_r]
    ///     z[r, j] = (softmax(z[r, :])[j] - (j == t_r)) * gradientScale / count
    ///
    /// `count` is the number of positions the mean is over (`rows` unless the logits of one batch
    /// are processed in chunks: then every chunk passes the batch's count, with `rowOffset` its
    /// first row in `targets` and `rowLosses`). Any vocabulary: a group of threads per row reads
    /// it twice (online max and sum of exponentials, then the gradient), with 16-byte loads after
    /// an unaligned head. A target outside `0..<vocabulary` gives a NaN loss.
    ///
    /// - Parameters:
    ///   - logits: `[rows, vocabulary]` in `storage` (the chunk's rows).
    ///   - targets: int32, `rows` of them from `rowOffset`.
    ///   - rowLosses: float32, `rows` of them written from `rowOffset`.
    public func crossEntropy(logits: DeviceBuffer, logitsOffset: Int = 0, targets: DeviceBuffer, rowLosses: DeviceBuffer,
                             rowOffset: Int = 0, rows: Int, vocabulary: Int, gradientScale: Float = 1, count: Int? = nil) throws {
        let name = "CUDALayerKernels.crossEntropy"
        check(name, "logits", logits, logitsOffset, rows * vocabulary, storage)
        check(name, "targets", targets, rowOffset, rows, .float32)
        check(name, "rowLosses", rowLosses, rowOffset, rows, .float32)
        require(vocabulary >= 1 && vocabulary <= Int(Int32.max) && rows <= Int(Int32.max), "\(name): vocabulary \(vocabulary) or rows \(rows) out of range")
        guard rows > 0 else { return }
        let scale = gradientScale / Float(count ?? rows)
        let group = Self.crossEntropyGroup(vocabulary: vocabulary), block = max(group, 256)
        try context.launch(functions["cross_entropy_\(storage)"]!, grid: (min((rows + block / group - 1) / (block / group), 65535), 1, 1),
                           block: (block, 1, 1),
                           arguments: [pointer(logits, logitsOffset, storage), pointer(targets, rowOffset, .float32),
                                       pointer(rowLosses, rowOffset, .float32), .int32(Int32(rows)), .int32(Int32(vocabulary)),
                                       .float32(scale), .int32(Int32(group))])
    }

    /// Threads per row of the cross-entropy: about 128 numbers each, a power of two in 32...1024.
    static func crossEntropyGroup(vocabulary: Int) -> Int {
        let wanted = max(1, (vocabulary + 127) / 128)
        return min(max(1 << (Int.bitWidth - (wanted - 1).leadingZeroBitCount), 32), 1024)
    }

    /// `mean[0] = float(sum of rowLosses[0..<count] in double / count)`, queued: the loss that
    /// `LanguageModel.loss` returns, left in device memory (float32 scalar). One thread block;
    /// fixed order.
    public func meanLoss(rowLosses: DeviceBuffer, count: Int, into mean: DeviceBuffer, meanOffset: Int = 0) throws {
        let name = "CUDALayerKernels.meanLoss"
        check(name, "rowLosses", rowLosses, 0, count, .float32)
        check(name, "mean", mean, meanOffset, 1, .float32)
        try context.launch(functions["mean_loss"]!, grid: (1, 1, 1), block: (1024, 1, 1),
                           arguments: [.buffer(rowLosses), .int64(Int64(count)), .int64(Int64(max(count, 1))),
                                       pointer(mean, meanOffset, .float32)])
    }

    // MARK: Gradient norm and clipping

    /// A stretch of float32 numbers in a device buffer: one parameter's gradient, or a whole arena.
    public struct Segment: Sendable {
        /// The buffer, the first element, and how many.
        public let buffer: DeviceBuffer, offset: Int, count: Int
        /// `count` float32 numbers of `buffer` from element `offset`.
        public init(_ buffer: DeviceBuffer, offset: Int = 0, count: Int) {
            (self.buffer, self.offset, self.count) = (buffer, offset, count)
        }
    }

    /// The clip state that `clipState(gradients:maxNorm:into:)` writes and `adamW` reads, as 16
    /// bytes of device memory: float32 `norm`, float32 `scale`, uint32 `nonFinite` (0 or 1), zero.
    public static let clipStateBytes = 16

    /// The global L2 norm of `gradients` and the clip scale, as `PhalanxTraining.clipGradients`
    /// computes them, written to `state` (`clipStateBytes`) with no host wait:
    ///
    ///     norm = float(sqrt(sum of g^2 in double)),   scale = maxNorm / norm if maxNorm > 0, norm > maxNorm and norm is finite, else 1
    ///     nonFinite = norm is not finite (a NaN or infinity in some gradient)
    ///
    /// The gradients are not changed: `adamW` multiplies by the scale as it reads them. Two stages
    /// in a fixed order: one double partial per `normChunk` numbers of each segment (a launch per
    /// segment), then one block adds them in segment and chunk order.
    public func clipState(gradients: [Segment], maxNorm: Float, into state: DeviceBuffer) throws {
        let name = "CUDALayerKernels.clipState"
        require(state.context === context && state.byteCount >= Self.clipStateBytes, "\(name): state needs \(Self.clipStateBytes) bytes")
        let chunks = gradients.map { segment -> Int in
            check(name, "a gradient", segment.buffer, segment.offset, segment.count, .float32)
            return (segment.count + Self.normChunk - 1) / Self.normChunk
        }
        let total = chunks.reduce(0, +)
        require(total <= Int(Int32.max), "\(name): too many gradient numbers")
        let partial = try DeviceBuffer(context: context, byteCount: max(total, 1) * 8)
        var slot = 0
        for (segment, count) in zip(gradients, chunks) where count > 0 {
            try context.launch(functions["sum_squares"]!, grid: (count, 1, 1), block: (256, 1, 1),
                               arguments: [pointer(segment.buffer, segment.offset, .float32), .int64(Int64(segment.count)),
                                           .int64(Int64(Self.normChunk)), .int64(Int64(bitPattern: partial.address + UInt64(slot * 8)))])
            slot += count
        }
        try context.launch(functions["clip_state"]!, grid: (1, 1, 1), block: (1024, 1, 1),
                           arguments: [.buffer(partial), .int32(Int32(total)), .float32(maxNorm), .buffer(state)])
    }

    /// The clip state in `state` (waits for the stream): the norm, the scale, and whether the
    /// norm was not finite.
    public static func readClipState(_ state: DeviceBuffer) throws -> (norm: Float, scale: Float, nonFinite: Bool) {
        let words = try state.download(UInt32.self, count: 4)
        return (Float(bitPattern: words[0]), Float(bitPattern: words[1]), words[2] != 0)
    }

    // MARK: AdamW

    /// One fused AdamW update (`PhalanxTraining.AdamW.update`) of `count` parameters, in place,
    /// queued; nothing at all changes when the clip state says `nonFinite`:
    ///
    ///     g = gradient * scale                           (scale from `clipState`)
    ///     m = b1 m + (1 - b1) g,   v = b2 v + (1 - b2) g g
    ///     w -= lr * ( (m / c1) / (sqrt(v / c2) + eps) + decay * w ),   c1 = 1 - b1^step, c2 = 1 - b2^step
    ///
    /// with the CPU's roundings (bit-identical in float32). `decay` is the optimizer's weight
    /// decay for parameters that decay (`decays` or `decayAll`) and 0 for the others; `step` is the
    /// step after increment (1 on the first update). `bfloat16Copy`, when given, receives the
    /// updated weights rounded to bfloat16 (for bfloat16 products). The gradient is not written.
    ///
    /// - Parameters:
    ///   - weights, gradients, firstMoments, secondMoments: float32, `count` numbers each from `offset`.
    ///   - bfloat16Copy: `count` bfloat16 numbers from `copyOffset`.
    public func adamW(weights: DeviceBuffer, gradients: DeviceBuffer, firstMoments: DeviceBuffer, secondMoments: DeviceBuffer,
                      offset: Int = 0, count: Int, bfloat16Copy: DeviceBuffer? = nil, copyOffset: Int = 0, clipState state: DeviceBuffer,
                      learningRate: Float, step: Int, beta1: Float = 0.9, beta2: Float = 0.95, epsilon: Float = 1e-8,
                      decay: Float) throws {
        let name = "CUDALayerKernels.adamW"
        for (label, buffer) in [("weights", weights), ("gradients", gradients), ("firstMoments", firstMoments), ("secondMoments", secondMoments)] {
            check(name, label, buffer, offset, count, .float32)
        }
        if let bfloat16Copy { check(name, "bfloat16Copy", bfloat16Copy, copyOffset, count, .bfloat16) }
        require(state.context === context && state.byteCount >= Self.clipStateBytes, "\(name): the clip state needs \(Self.clipStateBytes) bytes")
        require(step >= 1, "\(name): step must be at least 1 (the step after increment), got \(step)")
        guard count > 0 else { return }
        let correction1 = 1 - pow(beta1, Float(step)), correction2 = 1 - pow(beta2, Float(step))
        let addresses = [weights, gradients, firstMoments, secondMoments].map { address($0, offset, .float32) }
        let vectorized = addresses.allSatisfy { $0 % 16 == 0 } && (bfloat16Copy.map { address($0, copyOffset, .bfloat16) % 8 == 0 } ?? true)
        let body = vectorized ? count / 4 * 4 : 0
        for (path, start, n) in [("vec", 0, body), ("scalar", body, count - body)] where n > 0 {
            let copy: CUDAContext.Argument = bfloat16Copy.map { pointer($0, copyOffset + start, .bfloat16) } ?? .int64(0)
            try context.launch(functions["adamw_\(path)"]!, grid: blocks(path == "vec" ? n / 4 : n), block: (Self.threadsPerBlock, 1, 1),
                               arguments: [pointer(weights, offset + start, .float32), pointer(gradients, offset + start, .float32),
                                           pointer(firstMoments, offset + start, .float32), pointer(secondMoments, offset + start, .float32),
                                           copy, .int64(Int64(n)), .buffer(state), .float32(learningRate), .float32(beta1),
                                           .float32(beta2), .float32(epsilon), .float32(decay), .float32(correction1),
                                           .float32(correction2)])
        }
    }

    // MARK: Element-wise helpers

    /// `y += x` over `count` numbers (a residual add), queued: `y` in `storage`, `x` in
    /// `xStorage` (`storage` by default); float32 addition, rounded once to `y`'s storage.
    public func add(_ x: DeviceBuffer, xOffset: Int = 0, xStorage: NumberFormat? = nil, into y: DeviceBuffer, yOffset: Int = 0,
                    count: Int) throws {
        let xs = xStorage ?? storage
        check("CUDALayerKernels.add", "x", x, xOffset, count, xs)
        check("CUDALayerKernels.add", "y", y, yOffset, count, storage)
        try elementwise("add_\(storage)_\(xs)", count: count, pointers: [(y, yOffset, storage), (x, xOffset, xs)], width: 8) { _ in [] }
    }

    /// `y = x` converted from `source` to `destination` storage (rounded to nearest even into
    /// bfloat16, exact into float32), `count` numbers, queued.
    public func convert(_ x: DeviceBuffer, xOffset: Int = 0, from source: NumberFormat, into y: DeviceBuffer, yOffset: Int = 0,
                        to destination: NumberFormat, count: Int) throws {
        check("CUDALayerKernels.convert", "x", x, xOffset, count, source)
        check("CUDALayerKernels.convert", "y", y, yOffset, count, destination)
        try elementwise("convert_\(destination)_\(source)", count: count, pointers: [(y, yOffset, destination), (x, xOffset, source)],
                        width: 8) { _ in [] }
    }

    /// Sets `count` numbers of `x` (in `storage`) to `value`, queued.
    public func fill(_ x: DeviceBuffer, offset: Int = 0, count: Int, value: Float) throws {
        check("CUDALayerKernels.fill", "x", x, offset, count, storage)
        try elementwise("fill_\(storage)", count: count, pointers: [(x, offset, storage)], width: 8) { _ in [.float32(value)] }
    }

    /// `x *= factor` over `count` numbers (in `storage`), queued.
    public func scale(_ x: DeviceBuffer, offset: Int = 0, count: Int, by factor: Float) throws {
        check("CUDALayerKernels.scale", "x", x, offset, count, storage)
        try elementwise("scale_\(storage)", count: count, pointers: [(x, offset, storage)], width: 8) { _ in [.float32(factor)] }
    }

    // MARK: Launching

    /// `kernel` over `count` numbers of each of `pointers` (element offset and storage each):
    /// the `_vec` kernel (`width` numbers per thread) over the largest multiple of `width` when
    /// every pointer is 16-byte aligned, the `_scalar` kernel over the rest; `extra(first)` gives
    /// the arguments after the count for a launch starting at number `first`.
    private func elementwise(_ kernel: String, count: Int, pointers: [(DeviceBuffer, Int, NumberFormat)], width: Int,
                             extra: (Int) -> [CUDAContext.Argument]) throws {
        guard count > 0 else { return }
        let vectorized = pointers.allSatisfy { address($0.0, $0.1, $0.2) % 16 == 0 }
        let body = vectorized ? count / width * width : 0
        for (path, start, n) in [("vec", 0, body), ("scalar", body, count - body)] where n > 0 {
            let args = pointers.map { pointer($0.0, $0.1 + start, $0.2) } + [.int64(Int64(n))] + extra(start)
            try context.launch(functions["\(kernel)_\(path)"]!, grid: blocks(path == "vec" ? n / width : n),
                               block: (Self.threadsPerBlock, 1, 1), arguments: args)
        }
    }

    private func function(_ kernel: String, _ path: String) -> CUDAContext.Function { functions["\(kernel)_\(storage)_\(path)"]! }

    /// Thread blocks of `threadsPerBlock` for `threads` threads, at most `maximumBlocks` (the kernels stride).
    private func blocks(_ threads: Int) -> (Int, Int, Int) {
        (max(1, min((threads + Self.threadsPerBlock - 1) / Self.threadsPerBlock, Self.maximumBlocks)), 1, 1)
    }

    private func address(_ buffer: DeviceBuffer, _ offset: Int, _ format: NumberFormat) -> UInt64 {
        buffer.address + UInt64(offset * format.byteCount)
    }

    /// The device address of element `offset` of `buffer`, as a kernel argument.
    private func pointer(_ buffer: DeviceBuffer, _ offset: Int, _ format: NumberFormat) -> CUDAContext.Argument {
        .int64(Int64(bitPattern: address(buffer, offset, format)))
    }

    /// Stops unless `buffer` belongs to this context and holds `count` numbers of `format` from element `offset`.
    private func check(_ function: String, _ label: String, _ buffer: DeviceBuffer, _ offset: Int, _ count: Int, _ format: NumberFormat) {
        require(buffer.context === context, "\(function): \(label) belongs to another CUDAContext")
        require(offset >= 0 && count >= 0, "\(function): \(label) offset \(offset) and count \(count) must be non-negative")
        require((offset + count) * format.byteCount <= buffer.byteCount,
                "\(function): \(label) holds \(buffer.byteCount) bytes, expected \(count) \(format) numbers from element \(offset) (\((offset + count) * format.byteCount) bytes)")
    }
}

extension DeviceBuffer {
    /// The buffer with `values` queued for its start (in stream order, without waiting).
    fileprivate func with<T: BitwiseCopyable>(_ values: [T]) throws -> DeviceBuffer {
        try enqueueUpload(values)
        return self
    }
}

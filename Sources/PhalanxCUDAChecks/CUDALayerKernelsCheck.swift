import Foundation
import PhalanxCUDA
import PhalanxLayers
import PhalanxModels
import PhalanxRuntime
import PhalanxTraining

/// The comparisons of `CUDALayerKernels` with the CPU layers themselves (`RMSNorm`,
/// `RotaryEmbedding`, `SwiGLU`, `Embedding`, `Dropout`, `LanguageModel.loss`, `clipGradients`,
/// `AdamW`) on ragged sizes, in both storages, and the determinism of the reductions (two runs,
/// the same bits). The tests run them, and so does `phalanx bench cuda --check`.
///
/// In bfloat16 storage the CPU is given the same bfloat16-rounded inputs as the GPU, so what is
/// measured is the kernels' own error: one rounding of each output (2^-8 relative) and float32
/// reassociation.
public enum CUDALayerKernelsCheck {
    /// One comparison: what was compared, and each quantity's worst error and tolerance.
    public struct Outcome: Sendable, CustomStringConvertible {
        /// The kernel, storage and shape.
        public let label: String
        /// Each compared quantity with its worst error (`CUDAJaggedWindowCheck.relativeError`, or
        /// the largest absolute difference where the comparison is exact) and the largest error
        /// that passes (0: bit-identical).
        public let errors: [(name: String, error: Double, tolerance: Double)]

        /// Whether every error is within its tolerance.
        public var passed: Bool { errors.allSatisfy { $0.error <= $0.tolerance } }

        /// `PASS` or `FAIL`, the case, and each error with its tolerance, on one line.
        public var description: String {
            let parts = errors.map {
                $0.tolerance == 0 ? String(format: "%@ %.1e (exact)", $0.name, $0.error)
                                  : String(format: "%@ %.1e (<= %.0e)", $0.name, $0.error, $0.tolerance)
            }
            return "\(passed ? "PASS" : "FAIL") \(label): " + parts.joined(separator: "  ")
        }
    }

    /// Relative to the tensor's scale: float32 `f32` (float32 reassociation: 2e-6 for one row's
    /// sums, 1e-5 where a gradient sums many rows or a product follows); bfloat16 2^-7 (one
    /// rounding of the output, 2^-8, with margin), 2^-6 where the CPU's own inputs are unrounded.
    static func tolerance(_ storage: NumberFormat, f32: Double = 2e-6, bf16: Double = 1.0 / 128) -> Double {
        storage == .float32 ? f32 : bf16
    }

    /// Every case, in order: RMSNorm, RoPE, SwiGLU, embedding, dropout, cross-entropy, clipping
    /// and AdamW, helpers, determinism.
    public static func runAll(context: CUDAContext) throws -> [Outcome] {
        var outcomes: [Outcome] = []
        for storage in NumberFormat.allCases {
            let kernels = try CUDALayerKernels(context: context, storage: storage)
            for rows in [1, 7, 33, 1000] {
                for dim in [16, 48, 1000] { outcomes.append(try rmsNorm(kernels, rows: rows, dim: dim)) }
            }
            // Rows wider than 1024 take groups of 64-1024 threads (several warps per row; one
            // group per block from 256 threads on): dims 2048 (the small presets), 5000, 9000.
            for (rows, dim) in [(33, 2048), (7, 5000), (5, 9000)] { outcomes.append(try rmsNorm(kernels, rows: rows, dim: dim)) }
            for (batch, length, heads, headDim, start) in [(1, 1, 1, 16, 0), (2, 7, 3, 48, 0), (3, 33, 2, 16, 5), (1, 1000, 2, 64, 0),
                                                          (2, 9, 1, 6, 3)] {
                outcomes.append(try rotary(kernels, batch: batch, length: length, heads: heads, headDim: headDim, start: start))
            }
            for (rows, dim, hidden) in [(1, 16, 16), (7, 16, 48), (33, 48, 1000), (1000, 16, 1001)] {
                outcomes.append(try swiGLU(kernels, rows: rows, dim: dim, hidden: hidden))
            }
            for (rows, dim, vocabulary) in [(1, 16, 256), (7, 48, 1001), (33, 1000, 256), (1000, 48, 50257), (1000, 1001, 300)] {
                outcomes.append(try embedding(kernels, rows: rows, dim: dim, vocabulary: vocabulary))
            }
            for (rows, dim) in [(1, 16), (7, 48), (33, 1000), (1000, 1001)] {
                outcomes.append(try dropout(kernels, rows: rows, dim: dim))
            }
            for (rows, vocabulary) in [(1, 256), (7, 1001), (33, 50257), (1000, 256), (1000, 1001), (100, 50257)] {
                outcomes.append(try crossEntropy(kernels, rows: rows, vocabulary: vocabulary))
            }
            outcomes.append(try helpers(kernels))
            outcomes.append(try determinism(kernels))
        }
        let kernels = try CUDALayerKernels(context: context)
        for maxNorm: Float in [1e6, 0.05] {
            for copy in [false, true] { outcomes.append(try optimizer(kernels, maxNorm: maxNorm, bfloat16Copy: copy)) }
        }
        outcomes.append(try nonFinite(kernels))
        return outcomes
    }

    // MARK: Cases

    /// RMSNorm forward and backward against `RMSNorm`: y, dx, and dw added onto 0.25.
    public static func rmsNorm(_ kernels: CUDALayerKernels, rows: Int, dim: Int) throws -> Outcome {
        let storage = kernels.storage, context = kernels.context
        var rng = SeededGenerator(seed: UInt64(rows * 131 + dim))
        let x = storage.rounded(values(rows * dim, &rng, scale: 3)), dy = storage.rounded(values(rows * dim, &rng))
        let norm = RMSNorm("norm", dim: dim)
        for i in 0..<dim { norm.weight.value.pointer[i] = 1 + 0.3 * rng.normal() }
        norm.weight.gradient.fill(0.25)
        let xt = Tensor(x, shape: [rows, dim])
        let expectedY = norm.forward(xt).array
        let expectedDx = norm.backward(Tensor(dy, shape: [rows, dim]), input: xt).array
        let expectedDw = norm.weight.gradient.array

        let xd = try storage.upload(x, context: context), dyd = try storage.upload(dy, context: context)
        let w = try DeviceBuffer(context: context, floats: norm.weight.value.array)
        let y = try DeviceBuffer(context: context, byteCount: rows * dim * storage.byteCount)
        let dx = try DeviceBuffer(context: context, byteCount: rows * dim * storage.byteCount)
        let dw = try DeviceBuffer(context: context, floats: [Float](repeating: 0.25, count: dim))
        try kernels.rmsNormForward(x: xd, weight: w, output: y, rows: rows, dim: dim, eps: norm.eps)
        try kernels.rmsNormBackward(x: xd, weight: w, outputGradient: dyd, inputGradient: dx, weightGradient: dw,
                                    rows: rows, dim: dim, eps: norm.eps)
        return Outcome(label: "rmsnorm \(storage) \(rows)x\(dim)", errors: [
            ("y", error(try storage.download(y, count: rows * dim), expectedY), tolerance(storage)),
            ("dx", error(try storage.download(dx, count: rows * dim), expectedDx), tolerance(storage, f32: 1e-5)),
            ("dw", error(try dw.floats(), expectedDw), 1e-5),
        ])
    }

    /// RoPE forward and inverse against `RotaryEmbedding.rotate`.
    public static func rotary(_ kernels: CUDALayerKernels, batch: Int, length: Int, heads: Int, headDim: Int, start: Int) throws -> Outcome {
        let storage = kernels.storage, context = kernels.context, count = batch * length * heads * headDim
        var rng = SeededGenerator(seed: UInt64(count + start))
        let x = storage.rounded(values(count, &rng))
        let rope = RotaryEmbedding(headDim: headDim, base: 10000)
        let forward = Tensor(x, shape: [batch, length, heads * headDim])
        rope.rotate(forward, startPosition: start, inverse: false)
        let inverse = Tensor(x, shape: [batch, length, heads * headDim])
        rope.rotate(inverse, startPosition: start, inverse: true)
        let (cosines, sines) = rope.angles(upTo: start + length)
        let table = try kernels.rotaryTable(headDim: headDim, cosines: cosines, sines: sines)
        let a = try storage.upload(x, context: context), b = try storage.upload(x, context: context)
        try kernels.rotate(a, table: table, batch: batch, length: length, heads: heads, startPosition: start, inverse: false)
        try kernels.rotate(b, table: table, batch: batch, length: length, heads: heads, startPosition: start, inverse: true)
        return Outcome(label: "rope \(storage) \(batch)x\(length)x\(heads)x\(headDim) from \(start)", errors: [
            ("forward", error(try storage.download(a, count: count), forward.array), tolerance(storage)),
            ("inverse", error(try storage.download(b, count: count), inverse.array), tolerance(storage)),
        ])
    }

    /// The SwiGLU activation and its backward inside the CPU `SwiGLU` layer: its own projections
    /// (CPU) around the GPU element-wise part give the layer's output and input gradient. The GPU
    /// reads gate and up from one fused `[rows, 2 * hidden]` buffer and writes both gradients into one.
    public static func swiGLU(_ kernels: CUDALayerKernels, rows: Int, dim: Int, hidden: Int) throws -> Outcome {
        let storage = kernels.storage, context = kernels.context
        var rng = SeededGenerator(seed: UInt64(rows * 7 + dim * 3 + hidden))
        let layer = SwiGLU("mlp", dim: dim, hidden: hidden, rng: &rng)
        let x = Tensor(values(rows * dim, &rng), shape: [rows, dim]), dy = Tensor(values(rows * dim, &rng), shape: [rows, dim])
        let (expectedY, cache) = layer.forward(x)
        let expectedDx = layer.backward(dy, cache: cache)

        let gate = storage.rounded(layer.gateProj.forward(x).array), up = storage.rounded(layer.upProj.forward(x).array)
        var fused = [Float](repeating: 0, count: rows * 2 * hidden)
        for r in 0..<rows {
            for c in 0..<hidden { (fused[r * 2 * hidden + c], fused[r * 2 * hidden + hidden + c]) = (gate[r * hidden + c], up[r * hidden + c]) }
        }
        let z = try storage.upload(fused, context: context)
        let h = try DeviceBuffer(context: context, byteCount: rows * hidden * storage.byteCount)
        try kernels.swiGLUForward(gate: z, up: z, upOffset: hidden, inputRowStride: 2 * hidden, hidden: h, rows: rows, columns: hidden)
        let hidden32 = Tensor(try storage.download(h, count: rows * hidden), shape: [rows, hidden])
        let y = layer.downProj.forward(hidden32)
        let dh = storage.rounded(layer.downProj.backward(dy, input: hidden32).array)
        let dhd = try storage.upload(dh, context: context)
        let dz = try DeviceBuffer(context: context, byteCount: rows * 2 * hidden * storage.byteCount)
        try kernels.swiGLUBackward(gate: z, up: z, upOffset: hidden, inputRowStride: 2 * hidden, hiddenGradient: dhd,
                                   gateGradient: dz, upGradient: dz, upGradientOffset: hidden, gradientRowStride: 2 * hidden,
                                   rows: rows, columns: hidden)
        let gradients = try storage.download(dz, count: rows * 2 * hidden)
        var dGate = [Float](repeating: 0, count: rows * hidden), dUp = dGate
        for r in 0..<rows {
            for c in 0..<hidden { (dGate[r * hidden + c], dUp[r * hidden + c]) = (gradients[r * 2 * hidden + c], gradients[r * 2 * hidden + hidden + c]) }
        }
        let dx = layer.gateProj.backward(Tensor(dGate, shape: [rows, hidden]), input: x).array
        let dxUp = layer.upProj.backward(Tensor(dUp, shape: [rows, hidden]), input: x).array
        return Outcome(label: "swiglu \(storage) rows \(rows) dim \(dim) hidden \(hidden) (fused gate|up)", errors: [
            ("y", error(y.array, expectedY.array), tolerance(storage, f32: 1e-5, bf16: 1.0 / 64)),
            ("dx", error(zip(dx, dxUp).map { $0 + $1 }, expectedDx.array), tolerance(storage, f32: 1e-5, bf16: 1.0 / 64)),
        ])
    }

    /// Embedding gather and gradient against `Embedding` (bit-identical: the gradient adds each
    /// position's row in the CPU's order), the gradient added onto a non-zero one.
    public static func embedding(_ kernels: CUDALayerKernels, rows: Int, dim: Int, vocabulary: Int) throws -> Outcome {
        let storage = kernels.storage, context = kernels.context
        var rng = SeededGenerator(seed: UInt64(rows + dim * 5 + vocabulary))
        let table = Embedding("embed", vocabulary: vocabulary, dim: dim, rng: &rng)
        for i in 0..<(vocabulary * dim) { table.weight.gradient.pointer[i] = 0.01 * rng.normal() }
        let initial = table.weight.gradient.array
        let tokens = (0..<rows).map { _ in Int32(rng.next() % UInt64(min(vocabulary, 97))) }
        let dy = storage.rounded(values(rows * dim, &rng))
        let expectedY = storage.rounded(table.forward(tokens, batch: 1, length: rows).array)
        table.backward(Tensor(dy, shape: [rows, dim]), tokens: tokens)

        let tokenBuffer = try DeviceBuffer(context: context, byteCount: rows * 4)
        try tokenBuffer.upload(tokens)
        let weights = try DeviceBuffer(context: context, floats: table.weight.value.array)
        let y = try DeviceBuffer(context: context, byteCount: rows * dim * storage.byteCount)
        try kernels.embeddingForward(tokens: tokenBuffer, table: weights, output: y, rows: rows, dim: dim, vocabulary: vocabulary)
        let plan = try kernels.embeddingGradientPlan(tokens: tokens, vocabulary: vocabulary)
        let dw = try DeviceBuffer(context: context, floats: initial)
        try kernels.embeddingBackward(plan: plan, outputGradient: try storage.upload(dy, context: context), weightGradient: dw, dim: dim)
        return Outcome(label: "embedding \(storage) \(rows)x\(dim) V \(vocabulary) (bit-identical)", errors: [
            ("y", maximumDifference(try storage.download(y, count: rows * dim), expectedY), 0),
            ("dW", maximumDifference(try dw.floats(), table.weight.gradient.array), 0),
        ])
    }

    /// The dropout mask against `Dropout.apply` (bit-identical), whole and as two calls with an
    /// element index.
    public static func dropout(_ kernels: CUDALayerKernels, rows: Int, dim: Int) throws -> Outcome {
        let storage = kernels.storage, context = kernels.context, count = rows * dim
        var rng = SeededGenerator(seed: UInt64(count))
        let x = storage.rounded(values(count, &rng))
        let mask = Dropout(rate: 0.1, seed: 0x1234_5678_9abc, step: 17, microBatch: 2)
        let expected = Tensor(x, shape: [rows, dim])
        mask.apply(to: expected, block: 3, branch: 1)
        let whole = try storage.upload(x, context: context), split = try storage.upload(x, context: context)
        try kernels.dropout(whole, count: count, rate: 0.1, seed: 0x1234_5678_9abc, step: 17, microBatch: 2, block: 3, branch: 1)
        let half = count / 2 + 1
        try kernels.dropout(split, count: min(half, count), rate: 0.1, seed: 0x1234_5678_9abc, step: 17, microBatch: 2, block: 3, branch: 1)
        try kernels.dropout(split, offset: min(half, count), count: count - min(half, count), rate: 0.1, seed: 0x1234_5678_9abc, step: 17,
                            microBatch: 2, block: 3, branch: 1, elementIndex: min(half, count))
        let reference = storage.rounded(expected.array)
        return Outcome(label: "dropout \(storage) \(rows)x\(dim) rate 0.1 (bit-identical)", errors: [
            ("whole", maximumDifference(try storage.download(whole, count: count), reference), 0),
            ("split", maximumDifference(try storage.download(split, count: count), reference), 0),
        ])
    }

    /// Fused cross-entropy against `LanguageModel.loss` (mean loss and logits' gradient, scale 0.5)
    /// and `tokenLosses` (each row's loss), on a one-block model of that vocabulary whose logits
    /// are replaced by random ones.
    public static func crossEntropy(_ kernels: CUDALayerKernels, rows: Int, vocabulary: Int) throws -> Outcome {
        let storage = kernels.storage, context = kernels.context
        let model = try LanguageModel(ModelConfiguration(vocabulary: vocabulary, dim: 16, depth: 1, pattern: "A", attentionHeads: 1,
                                                         mlpHidden: 16), seed: 1)
        var rng = SeededGenerator(seed: UInt64(rows * 3 + vocabulary))
        let tokens = (0..<rows).map { _ in Int32(rng.next() % UInt64(vocabulary)) }
        let targets = (0..<rows).map { _ in Int32(rng.next() % UInt64(vocabulary)) }
        let cache = model.forward(tokens: tokens, batch: 1, length: rows)
        let logits = storage.rounded(values(rows * vocabulary, &rng, scale: 4))
        _ = cache.logits.buffer.update(fromContentsOf: logits)
        let expectedRows = model.tokenLosses(cache, targets: targets).map { Float($0) }
        let expectedMean = model.loss(cache, targets: targets, gradientScale: 0.5)

        let z = try storage.upload(logits, context: context)
        let t = try DeviceBuffer(context: context, byteCount: rows * 4)
        try t.upload(targets)
        let losses = try DeviceBuffer(context: context, byteCount: rows * 4), mean = try DeviceBuffer(context: context, byteCount: 4)
        try kernels.crossEntropy(logits: z, targets: t, rowLosses: losses, rows: rows, vocabulary: vocabulary, gradientScale: 0.5)
        try kernels.meanLoss(rowLosses: losses, count: rows, into: mean)
        let gradient = try storage.download(z, count: rows * vocabulary)
        return Outcome(label: "cross-entropy \(storage) \(rows)x\(vocabulary)", errors: [
            ("row losses", error(try losses.floats(), expectedRows), 1e-5),
            ("mean", error(try mean.floats(), [expectedMean]), 1e-5),
            ("dz", error(gradient, cache.logits.array), tolerance(storage, f32: 1e-5)),
        ])
    }

    /// `clipGradients` then `AdamW.update` (two steps) on three parameters (one decaying) against
    /// the GPU clip state and fused update: bit-identical without clipping; with clipping, the
    /// norm and scale within float32 summation order. With `bfloat16Copy`, the copy equals the
    /// weights rounded.
    public static func optimizer(_ kernels: CUDALayerKernels, maxNorm: Float, bfloat16Copy: Bool) throws -> Outcome {
        let context = kernels.context
        var rng = SeededGenerator(seed: 99)
        let sizes = [7, 1000, 33 * 1001]
        let parameters = sizes.enumerated().map { i, n in
            Parameter("p\(i)", Tensor(values(n, &rng), shape: [n]), decays: i == 1)
        }
        let optimizer = AdamW(parameters)
        let weights = try parameters.map { try DeviceBuffer(context: context, floats: $0.value.array) }
        let moments = try parameters.map { p in
            try (DeviceBuffer(context: context, floats: [Float](repeating: 0, count: p.value.count)),
                 DeviceBuffer(context: context, floats: [Float](repeating: 0, count: p.value.count)))
        }
        let copies = try parameters.map { try DeviceBuffer(context: context, byteCount: $0.value.count * 2) }
        let state = try DeviceBuffer(context: context, byteCount: CUDALayerKernels.clipStateBytes)
        var normError = 0.0, scaleError = 0.0
        for step in 1...2 {
            let gradients = try parameters.map { p in
                let g = values(p.value.count, &rng, scale: 0.01)
                _ = p.gradient.buffer.update(fromContentsOf: g)
                return try DeviceBuffer(context: context, floats: g)
            }
            try kernels.clipState(gradients: zip(gradients, sizes).map { CUDALayerKernels.Segment($0, count: $1) }, maxNorm: maxNorm, into: state)
            for (i, p) in parameters.enumerated() {
                try kernels.adamW(weights: weights[i], gradients: gradients[i], firstMoments: moments[i].0, secondMoments: moments[i].1,
                                  count: p.value.count, bfloat16Copy: bfloat16Copy ? copies[i] : nil, clipState: state,
                                  learningRate: 1e-3, step: step, decay: p.decays ? optimizer.hyperparameters.weightDecay : 0)
            }
            let exact = parameters.reduce(0.0) { sum, p in sum + p.gradient.array.reduce(0.0) { $0 + Double($1) * Double($1) } }.squareRoot()
            let norm = clipGradients(parameters, maxNorm: maxNorm)
            optimizer.update(learningRate: 1e-3)
            let gpu = try CUDALayerKernels.readClipState(state)
            normError = max(normError, abs(Double(gpu.norm) - exact) / exact)
            let expectedScale = norm > maxNorm ? maxNorm / norm : 1
            scaleError = max(scaleError, abs(Double(gpu.scale) - Double(expectedScale)) / Double(expectedScale))
        }
        let clipped = maxNorm < 1
        var errors: [(name: String, error: Double, tolerance: Double)] = [("norm", normError, 1e-6), ("scale", scaleError, 1e-5)]
        var w: [Float] = [], m: [Float] = [], v: [Float] = [], expectedW: [Float] = [], expectedM: [Float] = [], expectedV: [Float] = []
        var copyError = 0.0
        for (i, p) in parameters.enumerated() {
            let gpuWeights = try weights[i].floats()
            w += gpuWeights
            m += try moments[i].0.floats()
            v += try moments[i].1.floats()
            expectedW += p.value.array
            expectedM += optimizer.firstMoments[i].array
            expectedV += optimizer.secondMoments[i].array
            if bfloat16Copy { copyError = max(copyError, maximumDifference(BFloat16.floats(try copies[i].bfloat16()), BFloat16.rounded(gpuWeights))) }
        }
        let compare = clipped ? error : maximumDifference
        let exactness = clipped ? 1e-5 : 0
        errors += [("w", compare(w, expectedW), exactness), ("m", compare(m, expectedM), exactness), ("v", compare(v, expectedV), exactness)]
        if bfloat16Copy { errors.append(("bf16 copy", copyError, 0)) }
        return Outcome(label: "clip + adamw, 2 steps, maxNorm \(maxNorm)\(bfloat16Copy ? " + bf16 copy" : "")"
                           + (clipped ? "" : " (w, m, v bit-identical)"),
                       errors: errors)
    }

    /// A NaN in one gradient: the clip state says non-finite and AdamW leaves weights and moments unchanged.
    public static func nonFinite(_ kernels: CUDALayerKernels) throws -> Outcome {
        let context = kernels.context
        var rng = SeededGenerator(seed: 5)
        let w0 = values(1001, &rng)
        var g = values(1001, &rng)
        g[500] = .nan
        let w = try DeviceBuffer(context: context, floats: w0), grad = try DeviceBuffer(context: context, floats: g)
        let m = try DeviceBuffer(context: context, floats: values(1001, &rng)), v = try DeviceBuffer(context: context, floats: [Float](repeating: 1, count: 1001))
        let m0 = try m.floats()
        let state = try DeviceBuffer(context: context, byteCount: CUDALayerKernels.clipStateBytes)
        try kernels.clipState(gradients: [.init(grad, count: 1001)], maxNorm: 1, into: state)
        try kernels.adamW(weights: w, gradients: grad, firstMoments: m, secondMoments: v, count: 1001, clipState: state,
                          learningRate: 1e-3, step: 1, decay: 0.1)
        let flag = try CUDALayerKernels.readClipState(state).nonFinite
        return Outcome(label: "non-finite gradient: flag set, AdamW skipped", errors: [
            ("flag", flag ? 0 : 1, 0), ("w", maximumDifference(try w.floats(), w0), 0), ("m", maximumDifference(try m.floats(), m0), 0),
        ])
    }

    /// add (both storages of x), convert both ways, fill and scale on ragged counts and offsets (bit-identical).
    public static func helpers(_ kernels: CUDALayerKernels) throws -> Outcome {
        let storage = kernels.storage, context = kernels.context
        var worst: [(name: String, error: Double, tolerance: Double)] = []
        var rng = SeededGenerator(seed: 11)
        for other in NumberFormat.allCases {
            var addError = 0.0, convertError = 0.0
            for (count, offset) in [(1, 0), (7, 3), (1001, 0), (65539, 5)] {
                let y = storage.rounded(values(count + offset, &rng)), x = other.rounded(values(count + offset, &rng))
                let yd = try storage.upload(y, context: context), xd = try other.upload(x, context: context)
                try kernels.add(xd, xOffset: offset, xStorage: other, into: yd, yOffset: offset, count: count)
                let expected = storage.rounded((0..<(count + offset)).map { $0 < offset ? y[$0] : y[$0] + x[$0] })
                addError = max(addError, maximumDifference(try storage.download(yd, count: count + offset), expected))
                let converted = try DeviceBuffer(context: context, byteCount: (count + offset) * storage.byteCount)
                try kernels.convert(xd, from: other, into: converted, to: storage, count: count + offset)
                convertError = max(convertError, maximumDifference(try storage.download(converted, count: count + offset), storage.rounded(x)))
            }
            worst += [("add \(storage)+=\(other)", addError, 0), ("convert \(other)->\(storage)", convertError, 0)]
        }
        let x = storage.rounded(values(1003, &rng))
        let xd = try storage.upload(x, context: context)
        try kernels.scale(xd, offset: 1, count: 1001, by: 0.3)
        let scaled = storage.rounded((0..<1003).map { $0 >= 1 && $0 < 1002 ? x[$0] * 0.3 : x[$0] })
        worst.append(("scale", maximumDifference(try storage.download(xd, count: 1003), scaled), 0))
        try kernels.fill(xd, offset: 2, count: 1000, value: 1.5)
        let filled = (0..<1003).map { $0 >= 2 && $0 < 1002 ? 1.5 : scaled[$0] }
        worst.append(("fill", maximumDifference(try storage.download(xd, count: 1003), filled), 0))
        return Outcome(label: "helpers \(storage) (bit-identical)", errors: worst)
    }

    /// The reductions twice on the same inputs: RMSNorm backward (dx, dw), cross-entropy (losses,
    /// mean, gradient) and the clip state, bit for bit.
    public static func determinism(_ kernels: CUDALayerKernels) throws -> Outcome {
        let storage = kernels.storage, context = kernels.context
        var rng = SeededGenerator(seed: 3)
        let rows = 4096, dim = 1024, vocabulary = 50257, logitRows = 256
        let x = try storage.upload(values(rows * dim, &rng), context: context), dy = try storage.upload(values(rows * dim, &rng), context: context)
        let w = try DeviceBuffer(context: context, floats: values(dim, &rng))
        let logits = values(logitRows * vocabulary, &rng, scale: 4)
        let targets = try DeviceBuffer(context: context, byteCount: logitRows * 4)
        try targets.upload((0..<logitRows).map { _ in Int32(rng.next() % UInt64(vocabulary)) })
        let gradient = try DeviceBuffer(context: context, floats: values(3_000_001, &rng))
        var runs: [[UInt32]] = []
        for _ in 0..<2 {
            let dx = try DeviceBuffer(context: context, byteCount: rows * dim * storage.byteCount)
            let dw = try DeviceBuffer(context: context, floats: [Float](repeating: 0, count: dim))
            try kernels.rmsNormBackward(x: x, weight: w, outputGradient: dy, inputGradient: dx, weightGradient: dw, rows: rows, dim: dim)
            let z = try storage.upload(logits, context: context)
            let losses = try DeviceBuffer(context: context, byteCount: logitRows * 4), mean = try DeviceBuffer(context: context, byteCount: 4)
            try kernels.crossEntropy(logits: z, targets: targets, rowLosses: losses, rows: logitRows, vocabulary: vocabulary)
            try kernels.meanLoss(rowLosses: losses, count: logitRows, into: mean)
            let state = try DeviceBuffer(context: context, byteCount: CUDALayerKernels.clipStateBytes)
            try kernels.clipState(gradients: [.init(gradient, count: 3_000_001)], maxNorm: 1, into: state)
            var bits = try dx.download(UInt32.self) + dw.download(UInt32.self) + z.download(UInt32.self)
            bits += try losses.download(UInt32.self) + mean.download(UInt32.self) + state.download(UInt32.self)
            runs.append(bits)
        }
        let differing = zip(runs[0], runs[1]).filter { $0 != $1 }.count
        return Outcome(label: "determinism \(storage): rmsnorm backward, cross-entropy, clip state twice", errors: [
            ("words differing", Double(differing), 0),
        ])
    }

    // MARK: Helpers

    static func values(_ count: Int, _ rng: inout SeededGenerator, scale: Float = 1) -> [Float] {
        (0..<count).map { _ in scale * rng.normal() }
    }

    static func error(_ actual: [Float], _ expected: [Float]) -> Double {
        CUDAJaggedWindowCheck.relativeError(actual, expected)
    }

    /// The largest absolute difference (infinite when a non-finite number differs).
    static func maximumDifference(_ actual: [Float], _ expected: [Float]) -> Double {
        guard actual.count == expected.count else { return .infinity }
        var worst = 0.0
        for (a, e) in zip(actual, expected) where a.bitPattern != e.bitPattern {
            if !a.isFinite || !e.isFinite { return .infinity }
            worst = max(worst, abs(Double(a) - Double(e)))
        }
        return worst
    }
}

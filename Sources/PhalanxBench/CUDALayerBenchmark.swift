import Foundation
import PhalanxCUDA
import PhalanxLayers
import PhalanxRuntime
import SWR

/// The Phalanx layer and the exact recurrence of `phalanx bench cuda`.
extension CUDABenchmark {
    // MARK: Layer

    /// The layer in bfloat16 at dim 16 * heads for each --layer-shapes: forward and
    /// forward+backward against the same matrix products alone and, with --attention, against the
    /// attention layer; then each step alone, and every variant of the two kernels against the
    /// copy bandwidth.
    func timeLayer(_ device: CUDADevice, copy: Double) throws -> [String: Any] {
        let context = device.context, blas = device.blas
        let dim = PhalanxLayer.headDim * heads, kv = kvHeads ?? heads
        print("\nPhalanx layer, bf16, dim \(dim) (\(heads) heads x \(PhalanxLayer.headDim), \(kv) kv heads); cuBLAS \(blas.version) at \(blas.path)")
        let rate = try blas.measureRate(format: .bfloat16)
        print(String(format: "  cuBLAS bf16 GEMM 8192^3 (fp32 accumulation): %.0f TFLOP/s", rate / 1e12))
        var json: [String: Any] = ["dim": dim, "kv_heads": kv, "gemm_8192_tflops": rate / 1e12]

        let baseline = try attention.map { path -> [String: Any] in
            let data = try Data(contentsOf: URL(fileURLWithPath: path))
            guard let object = try JSONSerialization.jsonObject(with: data) as? [String: Any] else {
                throw BenchmarkSettingError("attention baseline \(path) holds no JSON object")
            }
            json["attention"] = object
            return object["shapes"] as? [String: Any] ?? [:]
        }

        var rng = SeededGenerator(seed: 11)
        let layer = PhalanxLayer("bench", .init(dim: dim, kvHeads: kv), rng: &rng)
        layer.move(to: .cuda(device), compute: .bfloat16)
        let kernels = try CUDAPhalanxKernels.on(device, storage: .bfloat16, blockLength: layer.configuration.blockLength)
        json["tuning"] = "\(kernels.tuning)"
        let shapes = layerShapes
        let tokens = shapes.map { $0.batch * $0.length }.max() ?? 0
        let xs = Tensor((0..<tokens * dim).map { _ in Float.random(in: -1...1, using: &rng) }, shape: [tokens, dim],
                        on: .cuda(device), format: .bfloat16)
        let dys = Tensor((0..<tokens * dim).map { _ in Float.random(in: -0.01...0.01, using: &rng) }, shape: [tokens, dim],
                         on: .cuda(device), format: .bfloat16)

        print("  median of \(repeats) x \(launches) calls, \(kernels.tuning); GEMM floor: the layer's own matrix products alone")
        var summary: [String] = []
        for shape in shapes {
            let rows = shape.batch * shape.length
            let x = Tensor(viewing: xs, offset: 0, shape: [shape.batch, shape.length, dim])
            let dy = Tensor(viewing: dys, offset: 0, shape: [shape.batch, shape.length, dim])
            let forward = try measure(context) { _ = layer.forward(x) }
            let forwardBackward = try measure(context) {
                let (_, cache) = layer.forward(x)
                _ = layer.backward(dy, cache: cache)
            }
            try device.checkFailure()
            let steps = try layerSteps(layer, kernels, batch: shape.batch, length: shape.length, x: x, dy: dy, copy: copy)
            let gemmForward = steps.gemmForward, gemmBoth = steps.gemmForward + steps.gemmBackward
            var entry: [String: Any] = [
                "forward_ms": forward, "forward_backward_ms": forwardBackward,
                "gemm_forward_ms": gemmForward, "gemm_forward_backward_ms": gemmBoth,
                "forward_over_gemm": forward / gemmForward, "forward_backward_over_gemm": forwardBackward / gemmBoth,
                "gemm_forward_tflops": 2.0 * Double(rows) * Double(dim) * Double(layer.columns.width + dim) / (gemmForward * 1e-3) / 1e12,
                "steps": steps.json,
            ]
            var line = String(format: "  B=%-2d L=%-6d forward %6.3f ms (GEMMs %6.3f, %4.2fx)   fwd+bwd %6.3f ms (GEMMs %6.3f, %4.2fx)",
                              shape.batch, shape.length, forward, gemmForward, forward / gemmForward,
                              forwardBackward, gemmBoth, forwardBackward / gemmBoth)
            if let reference = baseline?["B\(shape.batch)_L\(shape.length)"] as? [String: Any],
               let attentionForward = reference["forward_ms"] as? Double,
               let attentionBoth = reference["forward_backward_ms"] as? Double {
                line += String(format: "   attention %6.3f / %6.3f ms: %4.2fx / %4.2fx faster", attentionForward, attentionBoth,
                               attentionForward / forward, attentionBoth / forwardBackward)
                entry["attention_forward_ms"] = attentionForward
                entry["attention_forward_backward_ms"] = attentionBoth
                entry["speedup_forward"] = attentionForward / forward
                entry["speedup_forward_backward"] = attentionBoth / forwardBackward
            }
            print(line)
            print("      steps: " + steps.lines.joined(separator: "\n             "))
            summary.append(line)
            json["B\(shape.batch)_L\(shape.length)"] = entry
        }
        print("\nLayer summary")
        for line in summary { print(line) }
        return json
    }

    /// Each step of the layer alone for one shape: its matrix products (summed into the GEMM floor
    /// of each direction) and every variant of its two kernels, with the bandwidth the kernels
    /// reach (bytes they must move: forward reads z, writes mixed; backward reads z and dmixed,
    /// writes dz) as a fraction of the copy bandwidth.
    private func layerSteps(_ layer: PhalanxLayer, _ kernels: CUDAPhalanxKernels, batch: Int, length: Int, x: Tensor, dy: Tensor,
                            copy: Double) throws -> (gemmForward: Double, gemmBackward: Double, lines: [String], json: [String: Any]) {
        let context = kernels.context, rows = batch * length, gpu = x.device.cuda!
        let dim = layer.configuration.dim, width = layer.configuration.heads * PhalanxLayer.headDim, c = layer.columns
        let (_, cache) = layer.forward(x)
        let dMixed = Tensor(zeros: [rows, width], on: x.device, format: .bfloat16)
        let out = Tensor(uninitialized: [rows, max(dim, c.stride)], on: x.device, format: .bfloat16)
        // Each product of the layer's own list, on this shape's operands (dz stands in for itself:
        // the projections have its shape).
        let operands: [PhalanxLayer.Product: (Tensor, Tensor?)] = [
            .z: (x, nil), .y: (cache.mixed, nil), .dMixed: (dy, nil), .dOutputWeight: (dy, cache.mixed),
            .dInputWeight: (cache.projections, x), .dx: (cache.projections, nil),
        ]
        let gemms = PhalanxLayer.Product.allCases.map { product in
            (product.symbol, product.isBackward, { () throws -> Void in
                let (a, b) = operands[product]!
                try layer.multiply(product, rows: rows, a, b, into: out)
            })
        }
        // The input projection with the fastest of cuBLASLt's candidates (timed), for comparison
        // with the first choice that the layers take (deterministic from run to run).
        let searched = try CUBLAS(context: context)
        let z = CUBLAS.Matrix(cache.projections.deviceBuffer, .bfloat16, rows: rows, columns: c.width, stride: c.stride)
        let weight = layer.projB.value.compute.root.deviceBuffer
        let fastest = try measure(context) {
            try searched.gemm(.init(x.deviceBuffer, .bfloat16, rows: rows, columns: dim), .init(weight, .bfloat16, rows: c.width, columns: dim),
                              transposeB: true, into: z)
        }
        var json: [String: Any] = ["gemm_z_searched_ms": fastest]
        var gemmForward = 0.0, gemmBackward = 0.0, gemmLine: [String] = []
        for (name, backward, body) in gemms {
            let ms = try measure(context, body)
            if backward { gemmBackward += ms } else { gemmForward += ms }
            json["gemm_\(name)_ms"] = ms
            gemmLine.append(String(format: "%@ %.3f", name, ms))
        }

        let forwardBytes = Double(rows * (c.width + width) * 2), backwardBytes = Double(rows * (2 * c.width + width) * 2)
        let standard = kernels.tuning
        var kernelLines: [String] = []
        /// Times both kernels with `tuning`; returns the line fragment for each.
        func time(_ tuning: CUDAPhalanxKernels.Tuning, forward: Bool, backward: Bool) throws -> (String, String) {
            kernels.tuning = tuning
            var parts = ("", "")
            let heads = layer.configuration.heads
            if forward {
                let ms = try measure(context) { _ = layer.forwardKernel(cache.projections, batch: batch, length: length, on: gpu) }
                try gpu.checkFailure()
                let chunk = try kernels.chunkBlocks(batch: batch, length: length, heads: heads, backward: false)
                json["forward_kernel_v\(tuning.forwardChannels)_rows\(tuning.forwardRows)_chunk\(tuning.chunkBlocks.map(String.init) ?? "auto")_ms"] = ms
                parts.0 = String(format: "%.3f ms (%.0f%%, chunk %d)", ms, 100 * forwardBytes / (ms * 1e-3) / copy, chunk)
            }
            if backward {
                let ms = try measure(context) { _ = layer.backwardKernel(dMixed, cache: cache, on: gpu) }
                try gpu.checkFailure()
                let chunk = try kernels.chunkBlocks(batch: batch, length: length, heads: heads, backward: true)
                json["backward_kernel_rows\(tuning.backwardRows)_chunk\(tuning.chunkBlocks.map(String.init) ?? "auto")_ms"] = ms
                parts.1 = String(format: "%.3f ms (%.0f%%, chunk %d)", ms, 100 * backwardBytes / (ms * 1e-3) / copy, chunk)
            }
            return parts
        }
        kernelLines.append("forward kernel, channels x rows loaded together: " + (try CUDAPhalanxKernels.Tuning.forwardVariants.map { variant in
            var tuning = standard
            (tuning.forwardChannels, tuning.forwardRows) = variant
            return "\(variant.0)x\(variant.1): " + (try time(tuning, forward: true, backward: false)).0
        }).joined(separator: ", "))
        kernelLines.append("backward kernel, rows loaded together: " + (try CUDAPhalanxKernels.Tuning.backwardVariants.map { rows in
            var tuning = standard
            tuning.backwardRows = rows
            return "\(rows): " + (try time(tuning, forward: false, backward: true)).1
        }).joined(separator: ", "))
        let byChunk = try chunks.map { chunk in
            var tuning = standard
            tuning.chunkBlocks = chunk
            return (chunk, try time(tuning, forward: true, backward: true))
        }
        kernelLines.append("forward kernel by chunk: " + byChunk.map { "\($0.0): \($0.1.0)" }.joined(separator: ", "))
        kernelLines.append("backward kernel by chunk: " + byChunk.map { "\($0.0): \($0.1.1)" }.joined(separator: ", "))
        kernels.tuning = standard
        return (gemmForward, gemmBackward, ["GEMMs (ms) " + gemmLine.joined(separator: ", ")
                                            + String(format: " (z with the fastest timed candidate instead of the first choice: %.3f)", fastest)]
                                           + kernelLines, json)
    }

    // MARK: Exact recurrence

    /// The exact recurrence in bfloat16 at --heads for each --layer-shapes: forward and backward
    /// time and their effective bandwidth against the copy bandwidth.
    func timeExact(_ context: CUDAContext, copy: Double) throws -> [String: Any] {
        let exact = try CUDAExactRecurrence(context: context, storage: .bfloat16)
        print("\nExact recurrence (hierarchical: block solve, carrier scan, rerun), bf16, \(heads) heads x \(PhalanxLayer.headDim)")
        var json: [String: Any] = [:]
        var rng = SeededGenerator(seed: 5)
        for shape in layerShapes {
            let layout = SequenceLayout.batched(batch: shape.batch, length: shape.length, heads: heads, headDim: PhalanxLayer.headDim)
            let a = try exact.storage.upload((0..<layout.gateCount).map { _ in Float.random(in: 0...1, using: &rng) }, context: context)
            let u = try exact.storage.upload((0..<layout.elementCount).map { _ in Float.random(in: -1...1, using: &rng) }, context: context)
            let bytes = layout.elementCount * 2
            let y = try DeviceBuffer(context: context, byteCount: bytes), du = try DeviceBuffer(context: context, byteCount: bytes)
            let da = try DeviceBuffer(context: context, byteCount: layout.gateCount * 2)
            let forward = try measure(context) { try exact.forward(gates: a, inputs: u, output: y, layout: layout) }
            let backward = try measure(context) {
                try exact.backward(gates: a, outputs: y, outputGradient: u, inputGradient: du, gateGradient: da, layout: layout)
            }
            // Forward reads a, u and writes x; backward reads a, x, dx and writes du, da (minimum traffic).
            let forwardBytes = Double(2 * (layout.gateCount + 2 * layout.elementCount))
            let backwardBytes = Double(2 * (2 * layout.gateCount + 3 * layout.elementCount))
            print(String(format: "  B=%-2d L=%-6d forward %.4f ms (%4.0f GB/s, %4.1f%% of copy)   backward %.4f ms (%4.0f GB/s, %4.1f%% of copy)",
                         shape.batch, shape.length, forward, forwardBytes / forward / 1e6, 100 * forwardBytes / forward / 1e-3 / copy,
                         backward, backwardBytes / backward / 1e6, 100 * backwardBytes / backward / 1e-3 / copy))
            json["B\(shape.batch)_L\(shape.length)"] = ["forward_ms": forward, "backward_ms": backward,
                                                        "forward_fraction_of_copy": forwardBytes / forward / 1e-3 / copy,
                                                        "backward_fraction_of_copy": backwardBytes / backward / 1e-3 / copy]
        }
        return json
    }
}

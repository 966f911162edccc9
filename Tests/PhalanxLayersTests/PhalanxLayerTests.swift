import Checkpoint
import Foundation
import PhalanxLayers
import PhalanxRuntime
import PhalanxTestSupport
import SWR
import Testing

/// The Phalanx layer in double precision, straight from SWR.md section 6, for gradient checks.
struct PhalanxReference {
    let dim: Int, kvHeads: Int, gateScale: Double
    var heads: Int { dim / 16 }

    /// Parameters in `PhalanxLayer.parameters` order: a.w, a.b, b.w, b.b, c.w, c.b, v.w, out.w.
    func forward(x: [Double], batch: Int, length: Int, parameters p: [[Double]]) -> [Double] {
        let H = heads, KVH = kvHeads, rows = batch * length, group = H / KVH
        func linear(_ w: [Double], _ b: [Double]?, _ input: [Double], inputs: Int, outputs: Int) -> [Double] {
            LayerReference.linear(input, rows: rows, inputs: inputs, outputs: outputs, weight: w, bias: b)
        }
        let sig = { (z: Double) in 1 / (1 + exp(-z)) }
        let a = linear(p[0], p[1], x, inputs: dim, outputs: H).map { gateScale * sig($0) }
        let b = linear(p[2], p[3], x, inputs: dim, outputs: KVH * 16).map(sig)
        let c = linear(p[4], p[5], x, inputs: dim, outputs: KVH * 16)
        let v = linear(p[6], nil, x, inputs: dim, outputs: H * 16)
        var input = [Double](repeating: 0, count: rows * H * 16)
        for r in 0..<rows { for h in 0..<H { for k in 0..<16 {
            input[(r * H + h) * 16 + k] = b[r * KVH * 16 + (h / group) * 16 + k] * v[(r * H + h) * 16 + k]
        } } }
        let layout = SequenceLayout.batched(batch: batch, length: length, heads: H, headDim: 16)
        let s = Reference.jaggedWindow(gates: a, inputs: input, layout: layout, window: JaggedWindow()).output
        var mixed = s
        for r in 0..<rows { for h in 0..<H { for k in 0..<16 {
            let i = (r * H + h) * 16 + k
            mixed[i] = s[i] * c[r * KVH * 16 + (h / group) * 16 + k] + v[i]
        } } }
        return linear(p[7], nil, mixed, inputs: dim, outputs: dim)
    }
}

@Suite("Phalanx layer")
struct PhalanxLayerTests {
    func goldenLayer() throws -> PhalanxLayer {
        var rng = SeededGenerator(seed: 1)
        let layer = PhalanxLayer("", .init(dim: 64, kvHeads: 4), rng: &rng)
        try layer.load(from: SafetensorsFile(contentsOf: fixture("phalanx_kv4_f32.weights.safetensors")))
        return layer
    }

    @Test("float32 parity with the reference layer, output and every intermediate (length 100)")
    func float32Parity() throws {
        let layer = try goldenLayer()
        let io = try SafetensorsFile(contentsOf: fixture("phalanx_kv4_f32.io.safetensors"))
        let x = Tensor(try io.floats("x", shape: [2, 100, 64]), shape: [2, 100, 64])
        let (y, cache) = layer.forward(x)
        expectClose(y.array, try io.doubles("y"), tolerance: 1e-5, "y")
        let intermediates: [(String, Tensor, Int)] = [
            ("A", cache.gates, 1), ("X", cache.recurrenceInput, 16), ("V", cache.v, 16),
            ("h", cache.recurrence, 16), ("mix", cache.mixed, 16),
        ]
        for (key, tensor, channels) in intermediates {
            let expected = fromReferenceLayout(try io.floats(key), batch: 2, heads: 4, channels: channels, length: 100)
            expectClose(tensor.array, expected.map(Double.init), tolerance: 1e-5, key)
        }
        let c = fromReferenceLayout(try io.floats("C"), batch: 2, heads: 4, channels: 16, length: 100)
        expectClose(cache.c.array, c.map(Double.init), tolerance: 1e-5, "C")
    }

    @Test("bfloat16 parity: the reference's mixed-precision output, to bfloat16 tolerance")
    func bfloat16Parity() throws {
        var rng = SeededGenerator(seed: 1)
        let layer = PhalanxLayer("", .init(dim: 64, kvHeads: 4), rng: &rng)
        try layer.load(from: SafetensorsFile(contentsOf: fixture("phalanx_kv4_bf16.weights.safetensors")))
        let io = try SafetensorsFile(contentsOf: fixture("phalanx_kv4_bf16.io.safetensors"))
        let x = Tensor(try io.floats("x", shape: [2, 100, 64]), shape: [2, 100, 64])
        let (y, _) = layer.forward(x)
        // bfloat16 keeps 8 significant bits (2^-8 = 0.39% per rounding); the reference rounds at
        // every step, so its output sits a few such roundings from the float32 answer (measured
        // 0.47% on this file).
        expectClose(y.array, try io.doubles("y"), tolerance: 1e-2, "y")
    }

    @Test("gradients of input and every parameter against finite differences in double precision",
          arguments: [(1, Float(1)), (2, Float(0.8))])
    func gradients(kvHeads: Int, gateScale: Float) {
        var rng = SeededGenerator(seed: UInt64(kvHeads))
        let (batch, length, dim) = (2, 37, 32)
        let layer = PhalanxLayer("mixer", .init(dim: dim, kvHeads: kvHeads, gateScale: gateScale), rng: &rng)
        // Biases that push some gates near 1, so the carrier between blocks matters.
        layer.projABias.value.buffer.update(fromContentsOf: [3, -1])
        let x = randomTensor([batch, length, dim], _: &rng)
        let dy = randomTensor([batch, length, dim], _: &rng)
        let (_, cache) = layer.forward(x)
        layer.zeroGradients()
        let dx = layer.backward(dy, cache: cache)

        let reference = PhalanxReference(dim: dim, kvHeads: kvHeads, gateScale: Double(gateScale))
        let params = layer.parameters.map { $0.value.array.map(Double.init) }
        let x64 = x.array.map(Double.init), dy64 = dy.array.map(Double.init)
        let loss = { (x: [Double], p: [[Double]]) in dot(dy64, reference.forward(x: x, batch: batch, length: length, parameters: p)) }
        let inputProbes = probes(x64.count, limit: 60)
        expectClose(inputProbes.map { dx[$0] }, finiteDifferences(x64, probes: inputProbes) { loss($0, params) }, tolerance: .float32Layer, "dx")
        for (i, p) in layer.parameters.enumerated() {
            let ps = probes(params[i].count, limit: 40)
            let numeric = finiteDifferences(params[i], probes: ps) { v in
                var q = params
                q[i] = v
                return loss(x64, q)
            }
            expectClose(ps.map { p.gradient[$0] }, numeric, tolerance: .float32Layer, p.name)
        }
    }

    @Test("parameter names equal the reference checkpoint keys")
    func names() {
        var rng = SeededGenerator(seed: 0)
        let layer = PhalanxLayer("layers.3.mixer", .init(dim: 32, kvHeads: 1), rng: &rng)
        #expect(layer.parameters.map(\.name) == [
            "layers.3.mixer.param.proj_a.weight", "layers.3.mixer.param.proj_a.bias",
            "layers.3.mixer.param.proj_b.weight", "layers.3.mixer.param.proj_b.bias",
            "layers.3.mixer.param.proj_c.weight", "layers.3.mixer.param.proj_c.bias",
            "layers.3.mixer.param.proj_v.weight", "layers.3.mixer.proj_out.weight",
        ])
    }

    @Test("bad parameter files name the key and the expected shape")
    func badFiles() throws {
        var rng = SeededGenerator(seed: 0)
        let layer = PhalanxLayer("", .init(dim: 64, kvHeads: 2), rng: &rng)  // the file has kv heads 4
        let file = try SafetensorsFile(contentsOf: fixture("phalanx_kv4_f32.weights.safetensors"))
        #expect { try layer.load(from: file) } throws: {
            "\($0)".contains("param.proj_b.weight") && "\($0)".contains("[32, 64]")
        }
        let other = PhalanxLayer("layers.0", .init(dim: 64, kvHeads: 4), rng: &rng)
        #expect { try other.load(from: file) } throws: {
            "\($0)".contains("missing parameter 'layers.0.param.proj_a.weight'") && "\($0)".contains("[4, 64]")
        }
        try other.load(from: file, stripping: "layers.0.")
        let header = #"{"param.proj_a.weight":{"dtype":"I32","shape":[4,64],"data_offsets":[0,1024]}}"#
        var data = Data((0..<8).map { UInt8(truncatingIfNeeded: UInt64(header.utf8.count) >> (8 * $0)) })
        data.append(contentsOf: Array(header.utf8) + [UInt8](repeating: 0, count: 1024))
        #expect { try layer.load(from: SafetensorsFile(data: data)) } throws: {
            "\($0)".contains("param.proj_a.weight") && "\($0)".contains("I32") && "\($0)".contains("[4, 64]")
        }
    }
}

@Suite("Phalanx layer: state across calls")
struct PhalanxLayerStateTests {
    @Test("a prefill in ragged chunks, then one-token steps, equals one pass", arguments: [0, 1, 15, 16, 17, 40, 48])
    func chunksAndSteps(prompt: Int) {
        var rng = SeededGenerator(seed: 9)
        let layer = PhalanxLayer("", .init(dim: 32, kvHeads: 1), rng: &rng)
        layer.projABias.value.buffer.update(fromContentsOf: [4, 2])
        let (batch, length, dim) = (2, 70, 32)
        let x = randomTensor([batch, length, dim], _: &rng)
        let (full, _) = layer.forward(x)
        func rows(_ t: Tensor, _ range: Range<Int>) -> Tensor {
            let out = Tensor(zeros: [batch, range.count, dim])
            for b in 0..<batch {
                (out.pointer + b * range.count * dim).update(from: t.pointer + (b * length + range.lowerBound) * dim, count: range.count * dim)
            }
            return out
        }
        var state = layer.makeState(batch: batch)
        var start = 0, chunk = 0
        while start < prompt {
            let size = min([5, 0, 11][chunk % 3], prompt - start)
            chunk += 1
            let y = layer.infer(rows(x, start..<(start + size)), state: &state)
            expectClose(y.array, rows(full, start..<(start + size)).array.map(Double.init), tolerance: 1e-6, "prefill chunk at \(start)")
            start += size
        }
        for i in prompt..<length {
            let y = layer.infer(rows(x, i..<(i + 1)), state: &state)
            expectClose(y.array, rows(full, i..<(i + 1)).array.map(Double.init), tolerance: 1e-6, "step \(i)")
        }
        #expect(state.byteCount == batch * 2 * (2 * 16 + 1) * 4, "the state stays 2 heads x (2 x 16 + 1) floats per sequence")
    }
}

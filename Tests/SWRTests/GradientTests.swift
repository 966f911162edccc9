import PhalanxRuntime
import PhalanxTestSupport
import SWR
import Testing

/// Every backward kernel against central finite differences of the double-precision reference.
@Suite("Gradients against finite differences in double precision")
struct GradientTests {
    @Test("jagged window: inputs, gates and every part of a mid-block initial state",
          arguments: [1, 2], [5, 16, 21])
    func jaggedWindow(blocksSeen: Int, headDim: Int) {
        var rng = SeededGenerator(seed: UInt64(blocksSeen * 100 + headDim))
        let window = JaggedWindow(blockLength: 8, blocksSeen: blocksSeen)
        let layout = SequenceLayout.packed(offsets: [0, 37, 37, 50], heads: 2, headDim: headDim)
        let gates = (0..<layout.gateCount).map { _ in Float.random(in: 0.1...0.99, using: &rng) }
        let inputs = randomInputs(layout.elementCount, &rng)
        let cotangent = randomInputs(layout.elementCount, &rng).map(Double.init)
        var state = JaggedState(for: layout, blockLength: 8)
        state.offset = [3, 0, 7]
        state.local = randomInputs(state.local.count, &rng)
        state.carrier = randomInputs(state.carrier.count, &rng)
        state.gateProduct = (0..<state.gateProduct.count).map { _ in Float.random(in: 0.1...1, using: &rng) }

        var du = [Float](repeating: .nan, count: inputs.count), da = [Float](repeating: .nan, count: gates.count)
        let dy = cotangent.map(Float.init)
        let dState = gates.withUnsafeBufferPointer { a in
            inputs.withUnsafeBufferPointer { u in
                dy.withUnsafeBufferPointer { dy in
                    du.withUnsafeMutableBufferPointer { du in
                        da.withUnsafeMutableBufferPointer { da in
                            window.backward(gates: a, inputs: u, outputGradient: dy, layout: layout,
                                            initialState: state, inputGradient: du, gateGradient: da)
                        }
                    }
                }
            }
        }
        let a64 = gates.map(Double.init), u64 = inputs.map(Double.init)
        let s64 = Reference.JaggedState64(state)
        func loss(a: [Double] = a64, u: [Double] = u64, s: Reference.JaggedState64 = s64) -> Double {
            dot(cotangent, Reference.jaggedWindow(gates: a, inputs: u, layout: layout, window: window, initial: s).output)
        }
        let checks: [(String, [Float], [Double], ([Double]) -> Double)] = [
            ("du", du, u64, { loss(u: $0) }),
            ("da", da, a64, { loss(a: $0) }),
            ("d local", dState.local, s64.local, { var s = s64; s.local = $0; return loss(s: s) }),
            ("d gateProduct", dState.gateProduct, s64.gateProduct, { var s = s64; s.gateProduct = $0; return loss(s: s) }),
            ("d carrier", dState.carrier, s64.carrier, { var s = s64; s.carrier = $0; return loss(s: s) }),
        ]
        for (name, analytic, point, f) in checks {
            let probes = probes(point.count, limit: 160)
            let numeric = finiteDifferences(point, probes: probes, f)
            expectClose(probes.map { analytic[$0] }, numeric, tolerance: .float32Kernel, "\(name), k=\(blocksSeen), headDim \(headDim)")
        }
    }

    @Test("exact recurrence: inputs, gates and initial state", arguments: [3, 16])
    func exactRecurrence(headDim: Int) {
        var rng = SeededGenerator(seed: UInt64(headDim))
        let layout = SequenceLayout.packed(offsets: [0, 29, 29, 45], heads: 2, headDim: headDim)
        let gates = (0..<layout.gateCount).map { _ in Float.random(in: 0.1...0.99, using: &rng) }
        let inputs = randomInputs(layout.elementCount, &rng)
        let cotangent = randomInputs(layout.elementCount, &rng).map(Double.init)
        var state = ExactState(for: layout)
        state.x = randomInputs(state.x.count, &rng)
        let initial = state
        let outputs = exact(gates: gates, inputs: inputs, layout: layout, state: &state)

        var du = [Float](repeating: .nan, count: inputs.count), da = [Float](repeating: .nan, count: gates.count)
        let dy = cotangent.map(Float.init)
        let dState = gates.withUnsafeBufferPointer { a in
            outputs.withUnsafeBufferPointer { x in
                dy.withUnsafeBufferPointer { dy in
                    du.withUnsafeMutableBufferPointer { du in
                        da.withUnsafeMutableBufferPointer { da in
                            ExactRecurrence().backward(gates: a, outputs: x, outputGradient: dy, layout: layout,
                                                       initialState: initial, inputGradient: du, gateGradient: da)
                        }
                    }
                }
            }
        }
        let a64 = gates.map(Double.init), u64 = inputs.map(Double.init), x64 = initial.x.map(Double.init)
        func loss(a: [Double] = a64, u: [Double] = u64, x0: [Double] = x64) -> Double {
            dot(cotangent, Reference.exactRecurrence(gates: a, inputs: u, layout: layout, initial: x0).output)
        }
        let checks: [(String, [Float], [Double], ([Double]) -> Double)] = [
            ("du", du, u64, { loss(u: $0) }), ("da", da, a64, { loss(a: $0) }), ("dx0", dState.x, x64, { loss(x0: $0) }),
        ]
        for (name, analytic, point, f) in checks {
            let probes = probes(point.count, limit: .max)
            let numeric = finiteDifferences(point, probes: probes, f)
            expectClose(probes.map { analytic[$0] }, numeric, tolerance: .float32Kernel, "\(name), headDim \(headDim)")
        }
    }
}

@Suite("Backward output alignment")
struct BackwardAlignmentTests {
    @Test("64-byte aligned gradient buffers (written with streaming stores) equal unaligned ones")
    func alignedEqualsUnaligned() {
        var rng = SeededGenerator(seed: 77)
        let layout = SequenceLayout.batched(batch: 2, length: 70, heads: 3, headDim: 16)
        let gates = GateRegime.uniform.draw(layout.gateCount, &rng)
        let inputs = randomInputs(layout.elementCount, &rng), dy = randomInputs(layout.elementCount, &rng)
        let window = JaggedWindow()
        func gradients(offset: Int) -> [Float] {
            // `offset` floats past a 64-byte boundary: 0 takes the streaming path, 1 cannot.
            let raw = UnsafeMutableRawPointer.allocate(byteCount: (layout.elementCount + 16) * 4, alignment: 64)
            defer { raw.deallocate() }
            let du = UnsafeMutableBufferPointer(start: raw.bindMemory(to: Float.self, capacity: layout.elementCount + 16) + offset,
                                                count: layout.elementCount)
            var da = [Float](repeating: 0, count: layout.gateCount)
            gates.withUnsafeBufferPointer { a in
                inputs.withUnsafeBufferPointer { u in
                    dy.withUnsafeBufferPointer { dy in
                        da.withUnsafeMutableBufferPointer { da in
                            _ = window.backward(gates: a, inputs: u, outputGradient: dy, layout: layout,
                                                initialState: JaggedState(for: layout), inputGradient: du, gateGradient: da)
                        }
                    }
                }
            }
            return Array(du) + da
        }
        #expect(gradients(offset: 0) == gradients(offset: 1))
    }

    /// The operators whose backward passes are checked head by head below.
    enum Operator: CaseIterable {
        case exact, jaggedOneBlock, jaggedTwoBlocks
    }

    @Test("backward over many 16-channel heads in one work item equals each head alone",
          arguments: Operator.allCases, [16, 37])
    func backwardHeadGroups(_ op: Operator, heads: Int) {
        var rng = SeededGenerator(seed: UInt64(31 + heads))
        // One thread, so each sequence's heads form one work item: 16 heads take the unrolled
        // 16-head kernel, 37 the general one with two groups of 16 for the gate gradients' sums and
        // a ragged rest. 75 rows: blocks of 16 and a partial one.
        let length = 75
        let layout = SequenceLayout.batched(batch: 2, length: length, heads: heads, headDim: 16)
        let gates = (0..<layout.gateCount).map { _ in Float.random(in: 0.1...0.99, using: &rng) }
        let inputs = randomInputs(layout.elementCount, &rng), dy = randomInputs(layout.elementCount, &rng)
        /// `(du, da)` of the operator over `layout`, from zero.
        func gradients(_ layout: SequenceLayout, _ a: [Float], _ u: [Float], _ dy: [Float],
                       pool: WorkerPool = .shared) -> ([Float], [Float]) {
            var du = [Float](repeating: .nan, count: u.count), da = [Float](repeating: .nan, count: a.count)
            let x: [Float]
            switch op {
            case .exact:
                var state = ExactState(for: layout)
                x = exact(gates: a, inputs: u, layout: layout, state: &state)
            case .jaggedOneBlock, .jaggedTwoBlocks: x = []
            }
            a.withUnsafeBufferPointer { a in u.withUnsafeBufferPointer { u in x.withUnsafeBufferPointer { x in
                dy.withUnsafeBufferPointer { dy in
                    du.withUnsafeMutableBufferPointer { du in da.withUnsafeMutableBufferPointer { da in
                        switch op {
                        case .exact:
                            _ = ExactRecurrence().backward(gates: a, outputs: x, outputGradient: dy, layout: layout,
                                                           initialState: ExactState(for: layout), inputGradient: du, gateGradient: da,
                                                           pool: pool)
                        case .jaggedOneBlock, .jaggedTwoBlocks:
                            let window = JaggedWindow(blocksSeen: op == .jaggedOneBlock ? 1 : 2)
                            _ = window.backward(gates: a, inputs: u, outputGradient: dy, layout: layout,
                                                initialState: JaggedState(for: layout), inputGradient: du, gateGradient: da,
                                                pool: pool)
                        }
                    } }
                }
            } } }
            return (du, da)
        }
        let (du, da) = gradients(layout, gates, inputs, dy, pool: oneThread)
        let single = SequenceLayout.batched(batch: 2, length: length, heads: 1, headDim: 16)
        for h in Set([0, 15, 16, heads - 1]) where h < heads {
            let rows = 0..<(2 * length)
            let a = rows.map { gates[$0 * heads + h] }
            let u = rows.flatMap { r in inputs[((r * heads + h) * 16)..<((r * heads + h) * 16 + 16)] }
            let g = rows.flatMap { r in dy[((r * heads + h) * 16)..<((r * heads + h) * 16 + 16)] }
            let (duAlone, daAlone) = gradients(single, a, Array(u), Array(g))
            let duHere = rows.flatMap { r in du[((r * heads + h) * 16)..<((r * heads + h) * 16 + 16)] }
            #expect(Array(duHere) == duAlone, "du of head \(h), \(op)")
            expectClose(rows.map { da[$0 * heads + h] }, daAlone.map(Double.init), tolerance: .float32Kernel, "da of head \(h), \(op)")
        }
    }
}

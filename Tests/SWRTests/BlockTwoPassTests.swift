import PhalanxRuntime
import PhalanxTestSupport
import SWR
import Testing

@Suite("Block Two-Pass matrix form")
struct BlockTwoPassTests {
    @Test("log-space and linear-space transfer matrices give the streaming kernel's answer",
          arguments: BlockTwoPass.TransferSpace.allCases, [1, 2])
    func agreesWithStreaming(space: BlockTwoPass.TransferSpace, blocksSeen: Int) {
        var rng = SeededGenerator(seed: 21)
        for length in [1, 15, 16, 17, 63, 100] {
            for regime in GateRegime.allCases {
                let layout = SequenceLayout.batched(batch: 2, length: length, heads: 2, headDim: 16)
                let gates = regime.draw(layout.gateCount, &rng)
                let inputs = randomInputs(layout.elementCount, &rng)
                let window = JaggedWindow(blocksSeen: blocksSeen)
                var out = [Float](repeating: .nan, count: inputs.count)
                gates.withUnsafeBufferPointer { a in
                    inputs.withUnsafeBufferPointer { u in
                        out.withUnsafeMutableBufferPointer { y in
                            BlockTwoPass(window: window, space: space).forward(gates: a, inputs: u, output: y, layout: layout)
                        }
                    }
                }
                let expected = Reference.jaggedWindow(gates: gates.map(Double.init), inputs: inputs.map(Double.init),
                                                      layout: layout, window: window)
                // Log space turns each product into exp(sum of logs): a few ulps more per entry.
                expectClose(out, expected.output, tolerance: space == .log ? 4e-5 : .float32Kernel,
                            "\(space) \(regime) length \(length)")
            }
        }
    }
}

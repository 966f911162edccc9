import SWR
import Testing

@Suite("Misuse gets a message that says what was expected")
struct MisuseTests {
    @Test("non-finite gates are named by sequence, position and head")
    func nonFiniteGates() {
        let layout = SequenceLayout.packed(offsets: [0, 3, 5], heads: 2, headDim: 4)
        var gates = [Float](repeating: 0.5, count: layout.gateCount)
        gates.withUnsafeBufferPointer { g in #expect(throws: Never.self) { try layout.validateGates(g) } }
        gates[(3 + 1) * 2 + 1] = .nan
        gates.withUnsafeBufferPointer { g in
            #expect {
                try layout.validateGates(g)
            } throws: { error in
                guard let error = error as? InvalidGateError else { return false }
                return (error.sequence, error.position, error.head) == (1, 1, 1)
                    && "\(error)".contains("sequence 1, position 1, head 1 is nan")
            }
        }
    }

    @Test("a wrong buffer size stops with the expected size and the layout")
    func wrongSize() async {
        let result = await #expect(processExitsWith: .failure, observing: [\.standardErrorContent]) {
            let layout = SequenceLayout.batched(batch: 2, length: 10, heads: 3, headDim: 16)
            let gates = [Float](repeating: 0.5, count: 59)
            let inputs = [Float](repeating: 0, count: layout.elementCount)
            var output = inputs
            var state = JaggedState(for: layout)
            gates.withUnsafeBufferPointer { a in
                inputs.withUnsafeBufferPointer { u in
                    output.withUnsafeMutableBufferPointer { y in
                        JaggedWindow().forward(gates: a, inputs: u, output: y, layout: layout, state: &state)
                    }
                }
            }
        }
        let message = String(decoding: result?.standardErrorContent ?? [], as: UTF8.self)
        #expect(message.contains("gates holds 59 floats, expected 60 for 2 sequences, length 10, 3 heads x 16"))
    }

    @Test("negative lengths and decreasing offsets are refused")
    func negativeLengths() async {
        await #expect(processExitsWith: .failure) {
            _ = SequenceLayout.batched(batch: 1, length: -4, heads: 1, headDim: 16)
        }
        await #expect(processExitsWith: .failure) {
            _ = SequenceLayout.packed(offsets: [0, 5, 3], heads: 1, headDim: 16)
        }
    }
}

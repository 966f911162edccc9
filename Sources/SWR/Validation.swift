/// A gate the caller asked to validate was not finite.
public struct InvalidGateError: Error, CustomStringConvertible, Equatable {
    /// Index of the sequence in the layout.
    public let sequence: Int
    /// Position inside that sequence.
    public let position: Int
    /// Head of the gate.
    public let head: Int
    /// The non-finite gate (NaN or an infinity).
    public let value: Float

    /// Where the gate is, its value, and what was expected.
    public var description: String {
        "gate of sequence \(sequence), position \(position), head \(head) is \(value); gates must be finite (sigmoid outputs in [0, 1])"
    }
}

extension SequenceLayout {
    /// Checks that every gate is finite, naming the first one that is not.
    ///
    /// The kernels never check values (a NaN simply propagates, as in any float arithmetic);
    /// call this where gates come from outside, for example from a file or a user.
    ///
    /// - Parameter gates: `[rows, heads]`.
    public func validateGates(_ gates: UnsafeBufferPointer<Float>) throws {
        check("gates", count: gates.count, expected: gateCount, "SequenceLayout.validateGates")
        for s in 0..<sequenceCount {
            for i in 0..<lengths[s] {
                for h in 0..<heads {
                    let value = gates[(starts[s] + i) * heads + h]
                    if !value.isFinite { throw InvalidGateError(sequence: s, position: i, head: h, value: value) }
                }
            }
        }
    }
}

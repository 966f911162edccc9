import PhalanxRuntime
/// Where the sequences of a call live in memory, for every recurrence operator.
///
/// Layout (row-major, channels contiguous, the natural output of a Linear layer):
/// - inputs and outputs: `[rows, heads, headDim]`
/// - gates: `[rows, heads]`
///
/// A *row* is one position of one sequence. A uniform batch `[batch, length, heads, headDim]` is
/// `batched(...)`: sequence `b` is rows `b * length ..< (b + 1) * length`. A packed batch of
/// variable-length sequences is `packed(offsets:...)`: sequence `s` is rows
/// `offsets[s] ..< offsets[s + 1]`. Each sequence has its own state (see `ExactState`,
/// `JaggedState`), so sequences never mix.
public struct SequenceLayout: Hashable, Sendable, CustomStringConvertible {
    /// First row of each sequence.
    public let starts: [Int]
    /// Number of positions of each sequence (may be 0).
    public let lengths: [Int]
    /// Heads per row.
    public let heads: Int
    /// Channels per head.
    public let headDim: Int
    /// Rows spanned by all sequences: the leading dimension of the buffers.
    public let rowCount: Int

    /// A uniform batch: `[batch, length, heads, headDim]` inputs, `[batch, length, heads]` gates.
    public static func batched(batch: Int, length: Int, heads: Int, headDim: Int) -> SequenceLayout {
        require(batch >= 0 && length >= 0,
                     "SequenceLayout: batch and length must be non-negative, got batch \(batch), length \(length)")
        return SequenceLayout(
            starts: (0..<batch).map { $0 * length }, lengths: Array(repeating: length, count: batch),
            heads: heads, headDim: headDim, rowCount: batch * length)
    }

    /// Packed variable-length sequences: sequence `s` occupies rows `offsets[s] ..< offsets[s+1]`.
    ///
    /// - Parameter offsets: `sequenceCount + 1` non-decreasing row offsets starting at 0 (the
    ///   cumulative sequence lengths, as in `cu_seqlens`).
    public static func packed(offsets: [Int], heads: Int, headDim: Int) -> SequenceLayout {
        require(offsets.first == 0,
                     "SequenceLayout.packed: offsets must start at 0 (cumulative lengths), got \(offsets.prefix(3))")
        for s in 1..<offsets.count {
            require(offsets[s] >= offsets[s - 1],
                         "SequenceLayout.packed: offsets must not decrease, but offsets[\(s)] = \(offsets[s]) < offsets[\(s - 1)] = \(offsets[s - 1])")
        }
        return SequenceLayout(
            starts: Array(offsets.dropLast()), lengths: zip(offsets.dropFirst(), offsets).map { $0 - $1 },
            heads: heads, headDim: headDim, rowCount: offsets.last!)
    }

    private init(starts: [Int], lengths: [Int], heads: Int, headDim: Int, rowCount: Int) {
        require(heads >= 1 && headDim >= 1,
                     "SequenceLayout: heads and headDim must be at least 1, got heads \(heads), headDim \(headDim)")
        self.starts = starts
        self.lengths = lengths
        self.heads = heads
        self.headDim = headDim
        self.rowCount = rowCount
    }

    /// Number of sequences.
    public var sequenceCount: Int { starts.count }
    /// Floats in one row of inputs: `heads * headDim`.
    public var rowWidth: Int { heads * headDim }
    /// Number of gates: `rowCount * heads`.
    public var gateCount: Int { rowCount * heads }
    /// Number of input (and output) floats: `rowCount * heads * headDim`.
    public var elementCount: Int { rowCount * heads * headDim }

    /// Sequence count, length(s) and head shape, for messages.
    public var description: String {
        let uniform = Set(lengths).count <= 1
        let lengthText = uniform ? "length \(lengths.first ?? 0)" : "lengths \(lengths)"
        return "\(sequenceCount) sequences, \(lengthText), \(heads) heads x \(headDim)"
    }

    /// Stops with a message naming the buffer and the expected size when a count is wrong.
    func check(_ name: String, count: Int, expected: Int, _ function: String) {
        require(count == expected,
                     "\(function): \(name) holds \(count) floats, expected \(expected) for \(self)")
    }
}

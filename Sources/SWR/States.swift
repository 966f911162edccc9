import PhalanxRuntime
/// The state of the exact recurrence `x_i = a_i x_{i-1} + u_i` between two calls.
///
/// `x` is `[sequences, heads, headDim]`: the last state of each sequence (the initial state `x0`
/// before the first call, zero by default). A forward call reads it as `x_{-1}` and leaves the final
/// state in it, so a prefill split into chunks equals one pass; a one-position call is a decode step.
public struct ExactState: Hashable, Sendable {
    /// Number of sequences.
    public let sequences: Int
    /// Heads per position.
    public let heads: Int
    /// Channels per head.
    public let headDim: Int
    /// `[sequences, heads, headDim]`.
    public var x: [Float]

    /// The zero state for `sequences` sequences.
    public init(sequences: Int, heads: Int, headDim: Int) {
        self.sequences = sequences
        self.heads = heads
        self.headDim = headDim
        x = Array(repeating: 0, count: sequences * heads * headDim)
    }

    /// The zero state matching a layout.
    public init(for layout: SequenceLayout) {
        self.init(sequences: layout.sequenceCount, heads: layout.heads, headDim: layout.headDim)
    }

    func check(against layout: SequenceLayout, _ function: String) {
        require(sequences == layout.sequenceCount && heads == layout.heads && headDim == layout.headDim,
                     "\(function): state is for \(sequences) sequences, \(heads) heads x \(headDim), but the layout is \(layout)")
        require(x.count == sequences * heads * headDim,
                     "\(function): state.x holds \(x.count) floats, expected \(sequences * heads * headDim)")
    }
}

/// The state of a jagged-window recurrence at a position (SWR.md section 3).
///
/// Per sequence and head: the running local state `w` of the current block, the running inclusive
/// gate product `g` since the block start, the previous block's carrier `v` (its terminal local
/// state), and per sequence the offset inside the block. Its size never depends on how many
/// positions have been processed.
///
/// At a block start (`offset == 0`) only `carrier` matters (`local` is 0 and `gateProduct` 1); the
/// carrier then plays the role of an initial state `x0`. A forward call reads the state and leaves
/// the state after its last position, so chunks of any size continue exactly, and a one-position
/// call is a decode step.
public struct JaggedState: Hashable, Sendable {
    /// Number of sequences.
    public let sequences: Int
    /// Heads per position.
    public let heads: Int
    /// Channels per head.
    public let headDim: Int
    /// Positions per block, `l`; must equal the operator's.
    public let blockLength: Int
    /// `w`, `[sequences, heads, headDim]`.
    public var local: [Float]
    /// `g`, `[sequences, heads]`.
    public var gateProduct: [Float]
    /// `v` of the previous block, `[sequences, heads, headDim]`.
    public var carrier: [Float]
    /// Position inside the current block, `0 ..< blockLength`, per sequence.
    public var offset: [Int]

    /// The state at the start of every sequence: offset 0, carrier 0 (no history).
    public init(sequences: Int, heads: Int, headDim: Int, blockLength: Int = JaggedWindow.standardBlockLength) {
        require(blockLength >= 1, "JaggedState: blockLength must be at least 1, got \(blockLength)")
        self.sequences = sequences
        self.heads = heads
        self.headDim = headDim
        self.blockLength = blockLength
        local = Array(repeating: 0, count: sequences * heads * headDim)
        gateProduct = Array(repeating: 1, count: sequences * heads)
        carrier = Array(repeating: 0, count: sequences * heads * headDim)
        offset = Array(repeating: 0, count: sequences)
    }

    /// The empty-history state matching a layout.
    public init(for layout: SequenceLayout, blockLength: Int = JaggedWindow.standardBlockLength) {
        self.init(sequences: layout.sequenceCount, heads: layout.heads, headDim: layout.headDim,
                  blockLength: blockLength)
    }

    /// Bytes of floating-point state held per sequence: `(2 * headDim + 1) * heads` floats,
    /// whatever the context length.
    public var bytesPerSequence: Int { (2 * headDim + 1) * heads * MemoryLayout<Float>.stride }

    func check(against layout: SequenceLayout, blockLength: Int, _ function: String) {
        require(sequences == layout.sequenceCount && heads == layout.heads && headDim == layout.headDim,
                     "\(function): state is for \(sequences) sequences, \(heads) heads x \(headDim), but the layout is \(layout)")
        require(self.blockLength == blockLength,
                     "\(function): state has block length \(self.blockLength), the operator \(blockLength)")
        require(local.count == sequences * heads * headDim && carrier.count == local.count
                        && gateProduct.count == sequences * heads && offset.count == sequences,
                     "\(function): state arrays do not match \(sequences) sequences, \(heads) heads x \(headDim)")
        require(offset.allSatisfy { (0..<blockLength).contains($0) },
                     "\(function): state offsets must lie in 0..<\(blockLength), got \(offset)")
    }
}

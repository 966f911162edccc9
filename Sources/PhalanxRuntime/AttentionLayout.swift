/// Shapes of one attention call: a uniform batch of sequences of equal length. One contract for
/// the CPU kernel (`AttentionKernel`, PhalanxLayers) and the GPU kernels (`CUDAAttention`,
/// PhalanxCUDA), which is why it lives here, below both.
///
/// Layout (row-major, channels contiguous, the natural output of a Linear layer):
/// - queries and outputs: `[batch, length, heads, headDim]`
/// - keys and values: `[batch, length, kvHeads, headDim]`
/// - log-sum-exp of each query row: `[batch, heads, length]`
///
/// Query head `h` reads key/value head `h / (heads / kvHeads)` (grouped-query attention;
/// `kvHeads == heads` is ordinary multi-head attention, `kvHeads == 1` multi-query).
public struct AttentionLayout: Hashable, Sendable, CustomStringConvertible {
    /// Sequences in the call.
    public let batch: Int
    /// Positions per sequence.
    public let length: Int
    /// Query heads.
    public let heads: Int
    /// Key/value heads; divides `heads`.
    public let kvHeads: Int
    /// Channels per head.
    public let headDim: Int

    /// The shapes of a call: `batch` and `length` non-negative, `heads`, `kvHeads` and `headDim` at
    /// least 1, `kvHeads` dividing `heads`.
    public init(batch: Int, length: Int, heads: Int, kvHeads: Int, headDim: Int) {
        require(batch >= 0 && length >= 0, "AttentionLayout: batch and length must be non-negative, got \(batch), \(length)")
        require(heads >= 1 && headDim >= 1, "AttentionLayout: heads and headDim must be positive, got \(heads), \(headDim)")
        require(kvHeads >= 1 && heads % kvHeads == 0,
                "AttentionLayout: \(heads) query heads are not divisible into \(kvHeads) key/value heads")
        self.batch = batch
        self.length = length
        self.heads = heads
        self.kvHeads = kvHeads
        self.headDim = headDim
    }

    /// Query heads per key/value head.
    public var groupSize: Int { heads / kvHeads }
    /// Elements of the queries (and outputs).
    public var queryCount: Int { batch * length * heads * headDim }
    /// Elements of the keys (and values).
    public var keyCount: Int { batch * length * kvHeads * headDim }
    /// Elements of the log-sum-exp.
    public var rowCount: Int { batch * heads * length }

    /// Query-key pairs that take part (`j <= i`, and `j > i - window` with a window), over every
    /// sequence and head: the work of the kernel. Full causal: `batch * heads * L (L + 1) / 2`.
    public func visiblePairs(window: Int?) -> Int {
        let w = min(window ?? length, length)
        // sum_{i < L} min(i + 1, w) = w (w + 1) / 2 + (L - w) w
        return batch * heads * (w * (w + 1) / 2 + (length - w) * w)
    }

    /// Forward FLOPs of attention over these shapes: the two matrix products over the visible
    /// pairs, `4 * pairs * headDim`.
    public func forwardFlops(window: Int?) -> Double { 4 * Double(visiblePairs(window: window)) * Double(headDim) }

    /// The five sizes, for messages.
    public var description: String {
        "[batch \(batch), length \(length), heads \(heads) (kv \(kvHeads)), headDim \(headDim)]"
    }
}

import PhalanxRuntime

/// Next-token examples: row `b` of `inputs` is a window of the corpus, and `targets[b, t]` is the
/// token that follows `inputs[b, t]`.
///
/// Layout: `inputs` and `targets` are `[batchSize, contextLength]`, row-major.
public struct Batch: Sendable, Equatable {
    /// Rows (windows) in the batch, `B`.
    public var batchSize: Int
    /// Positions per row, `T`.
    public var contextLength: Int
    /// The input tokens, `[batchSize, contextLength]`.
    public var inputs: [Int32]
    /// The tokens to predict, `[batchSize, contextLength]`: each input's successor in the split.
    public var targets: [Int32]

    /// A batch whose rows are the windows of `contextLength + 1` tokens starting at `starts`.
    init(split: TokenSplit, starts: [Int], contextLength: Int) {
        let t = contextLength
        batchSize = starts.count
        self.contextLength = t
        inputs = [Int32](repeating: 0, count: starts.count * t)
        targets = inputs
        inputs.withUnsafeMutableBufferPointer { inputs in
            targets.withUnsafeMutableBufferPointer { targets in
                for (b, start) in starts.enumerated() {
                    split.copy(start ..< start + t, into: inputs.baseAddress! + b * t)
                    split.copy(start + 1 ..< start + t + 1, into: targets.baseAddress! + b * t)
                }
            }
        }
    }
}

/// Draws training batches: `batchSize` windows of `contextLength + 1` tokens at uniformly random
/// starts in `0 ... split.count - contextLength - 1` (with replacement), from a seeded generator.
///
/// The whole state is the three stored properties, and it is `Codable`: save it with a checkpoint
/// and a resumed run draws exactly the batches the uninterrupted run would have drawn. Starts are
/// drawn with Lemire's multiply-and-reject method written out here, not `Int.random(in:)`, so the
/// stream does not depend on the standard library's implementation.
public struct BatchSampler: Codable, Sendable, Equatable {
    /// Windows per batch.
    public let batchSize: Int
    /// Input positions per window; each window reads `contextLength + 1` tokens.
    public let contextLength: Int
    /// The stream the starts are drawn from; its state is where the sampler stands.
    public var generator: SeededGenerator

    /// A sampler whose stream starts from `seed`; `batchSize` and `contextLength` must be positive.
    public init(batchSize: Int, contextLength: Int, seed: UInt64) {
        self.init(batchSize: batchSize, contextLength: contextLength, generator: SeededGenerator(seed: seed))
    }

    /// A sampler that continues `generator`'s stream.
    public init(batchSize: Int, contextLength: Int, generator: SeededGenerator) {
        require(batchSize > 0 && contextLength > 0, "BatchSampler: batchSize and contextLength must be positive, got \(batchSize) and \(contextLength)")
        self.batchSize = batchSize
        self.contextLength = contextLength
        self.generator = generator
    }

    /// The next batch from `split`, which must hold at least `contextLength + 1` tokens.
    public mutating func next(from split: TokenSplit) -> Batch {
        Batch(split: split, starts: nextStarts(in: split), contextLength: contextLength)
    }

    /// The starts of the next batch's `batchSize` windows in `split`, in row order.
    mutating func nextStarts(in split: TokenSplit) -> [Int] {
        require(split.count > contextLength, "BatchSampler: a split of \(split.count) tokens is too short for windows of contextLength + 1 = \(contextLength + 1)")
        let positions = UInt64(split.count - contextLength)
        return (0..<batchSize).map { _ in Int(uniform(below: positions)) }
    }

    /// A uniform draw from `0 ..< n` (Lemire, "Fast Random Integer Generation in an Interval", 2019).
    private mutating func uniform(below n: UInt64) -> UInt64 {
        var product = generator.next().multipliedFullWidth(by: n)
        if product.low < n {
            let threshold = (0 &- n) % n
            while product.low < threshold { product = generator.next().multipliedFullWidth(by: n) }
        }
        return product.high
    }
}

/// Evaluation batches over a whole split in non-overlapping windows, in order.
///
/// Window `w` has inputs at positions `w*T ..< (w+1)*T` and targets one further on, so every
/// token at positions `1 ... windowCount*T` is predicted exactly once, each from at most `T`
/// tokens of context (the context restarts at every window). The last `(count - 1) % T` tokens
/// are not scored (fewer than one window); a split shorter than `T + 1` gives no windows. Each
/// batch holds `batchSize` windows, the last one possibly fewer. Run it once per context length
/// to compare a model at several lengths.
public struct EvaluationBatches: Sequence, IteratorProtocol, Sendable {
    /// The split scored.
    public let split: TokenSplit
    /// Positions per window, `T`.
    public let contextLength: Int
    /// Windows per batch (the last batch may hold fewer).
    public let batchSize: Int
    /// How many windows are scored: `(count - 1) / contextLength`, capped by `maxWindows`.
    public let windowCount: Int
    private var nextWindow = 0

    /// - Parameter maxWindows: score only the first this many windows (for a quick evaluation).
    public init(split: TokenSplit, contextLength: Int, batchSize: Int, maxWindows: Int? = nil) {
        require(batchSize > 0 && contextLength > 0, "EvaluationBatches: batchSize and contextLength must be positive, got \(batchSize) and \(contextLength)")
        require((maxWindows ?? 0) >= 0, "EvaluationBatches: maxWindows must not be negative")
        self.split = split
        self.contextLength = contextLength
        self.batchSize = batchSize
        let all = Swift.max(0, split.count - 1) / contextLength
        windowCount = Swift.min(all, maxWindows ?? all)
    }

    /// The number of tokens scored: `windowCount * contextLength`.
    public var targetCount: Int { windowCount * contextLength }

    /// The next batch of up to `batchSize` consecutive windows, or nil after the last window.
    public mutating func next() -> Batch? {
        guard nextWindow < windowCount else { return nil }
        let windows = nextWindow ..< Swift.min(nextWindow + batchSize, windowCount)
        nextWindow = windows.upperBound
        return Batch(split: split, starts: windows.map { $0 * contextLength }, contextLength: contextLength)
    }
}

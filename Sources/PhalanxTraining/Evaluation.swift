import Foundation
import PhalanxData
import PhalanxModels

/// A model's quality on held-out text at one context length.
public struct EvaluationResult: Sendable, Equatable {
    /// Tokens per window.
    public let contextLength: Int
    /// Mean cross-entropy in nats per token.
    public let loss: Double
    /// Tokens scored.
    public let tokens: Int
    /// Bytes of text those tokens stand for (equal to `tokens` for the byte tokenizer).
    public let bytes: Int
    /// When asked for: the mean cross-entropy at each position of the windows, `[contextLength]`,
    /// position 1 (which sees no context) first: whether, and how far, a model uses its context.
    public let lossByPosition: [Double]?

    /// `exp(loss)`.
    public var perplexity: Double { exp(loss) }
    /// Bits per byte of text: `loss * tokens / (bytes * ln 2)`, comparable across tokenizers.
    public var bitsPerByte: Double { loss * Double(tokens) / (Double(max(bytes, 1)) * log(2)) }
}

/// Scoring a model on held-out tokens.
public enum Evaluation {
    /// Scores `split` in non-overlapping windows of `contextLength` (each position predicts the
    /// next token with the context of its window), at most `maxWindows` windows; with
    /// `byPosition`, also the loss at each position of the window, from the same forward passes.
    public static func evaluate(_ model: LanguageModel, split: TokenSplit, tokenizer: any Tokenizer, contextLength: Int,
                                batchSize: Int, maxWindows: Int? = nil, byPosition: Bool = false) -> EvaluationResult {
        var batches = EvaluationBatches(split: split, contextLength: contextLength, batchSize: batchSize, maxWindows: maxWindows)
        var total = 0.0, tokens = 0, bytes = 0
        var positionSums = [Double](repeating: 0, count: byPosition ? contextLength : 0)
        while let batch = batches.next() {
            let cache = model.forward(tokens: batch.inputs, batch: batch.batchSize, length: batch.contextLength)
            if byPosition {
                for (i, loss) in model.tokenLosses(cache, targets: batch.targets).enumerated() {
                    positionSums[i % contextLength] += loss
                    total += loss
                }
            } else {
                total += Double(model.loss(cache, targets: batch.targets, gradientScale: 0)) * Double(batch.targets.count)
            }
            tokens += batch.targets.count
            for t in batch.targets { bytes += tokenizer.bytes(of: t).count }
        }
        let windows = tokens / contextLength
        return EvaluationResult(contextLength: contextLength, loss: tokens > 0 ? total / Double(tokens) : .nan,
                                tokens: tokens, bytes: bytes,
                                lossByPosition: byPosition ? positionSums.map { windows > 0 ? $0 / Double(windows) : .nan } : nil)
    }

    /// The mean of `losses` (per position, position 1 first) over each band of positions cut at
    /// `edges`: `edges` [64, 512] over 2048 positions give 1...64, 65...512 and 513...2048.
    /// Edges at or beyond the last position are dropped.
    public static func bands(_ losses: [Double], edges: [Int]) -> [(positions: ClosedRange<Int>, loss: Double)] {
        let cuts = edges.filter { $0 >= 1 && $0 < losses.count }.sorted()
        var bands: [(positions: ClosedRange<Int>, loss: Double)] = []
        var first = 1
        for last in cuts + [losses.count] where last >= first {
            let slice = losses[(first - 1)..<last]
            bands.append((first...last, slice.reduce(0, +) / Double(slice.count)))
            first = last + 1
        }
        return bands
    }
}

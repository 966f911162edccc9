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

    /// `exp(loss)`.
    public var perplexity: Double { exp(loss) }
    /// Bits per byte of text: `loss * tokens / (bytes * ln 2)`, comparable across tokenizers.
    public var bitsPerByte: Double { loss * Double(tokens) / (Double(max(bytes, 1)) * log(2)) }
}

/// Scoring a model on held-out tokens.
public enum Evaluation {
    /// Scores `split` in non-overlapping windows of `contextLength` (each position predicts the
    /// next token with the context of its window), at most `maxWindows` windows.
    public static func evaluate(_ model: LanguageModel, split: TokenSplit, tokenizer: any Tokenizer,
                                contextLength: Int, batchSize: Int, maxWindows: Int? = nil) -> EvaluationResult {
        var batches = EvaluationBatches(split: split, contextLength: contextLength, batchSize: batchSize, maxWindows: maxWindows)
        var total = 0.0, tokens = 0, bytes = 0
        while let batch = batches.next() {
            let cache = model.forward(tokens: batch.inputs, batch: batch.batchSize, length: batch.contextLength)
            let loss = model.loss(cache, targets: batch.targets, gradientScale: 0)
            total += Double(loss) * Double(batch.targets.count)
            tokens += batch.targets.count
            for t in batch.targets { bytes += tokenizer.bytes(of: t).count }
        }
        return EvaluationResult(contextLength: contextLength, loss: tokens > 0 ? total / Double(tokens) : .nan,
                                tokens: tokens, bytes: bytes)
    }
}

import Foundation
import PhalanxData
import PhalanxLayers
import PhalanxModels
import PhalanxRuntime

/// Many prompts completed together (`phalanx generate --prompts FILE`): prompts of any lengths
/// are prefilled one by one and decoded as one batch (`LanguageModel.generate(_:prefillChunk:stop:)`),
/// each with its own budget, stop string and seeded sampler, so a prompt's completion is the one
/// it gets alone.
public enum BatchGeneration {
    /// One prompt and what overrides the defaults for it. From a file: a plain line is a prompt
    /// (`\n` and `\\` inside it stand for a newline and a backslash); a line starting with `{` is
    /// a JSON object `{"prompt": "...", "max_tokens": 50, "stop": "\n\n", "seed": 7}` (all but
    /// `prompt` optional).
    public struct Prompt: Sendable, Equatable, Decodable {
        /// The prompt text.
        public var prompt: String
        /// Tokens to generate at most, stop string and sampler seed; nil takes the defaults.
        public var maxTokens: Int?, stop: String?, seed: UInt64?

        enum CodingKeys: String, CodingKey {
            case prompt, maxTokens = "max_tokens", stop, seed
        }

        /// A prompt with the defaults' settings.
        public init(prompt: String, maxTokens: Int? = nil, stop: String? = nil, seed: UInt64? = nil) {
            (self.prompt, self.maxTokens, self.stop, self.seed) = (prompt, maxTokens, stop, seed)
        }
    }

    /// What every prompt gets unless its line says otherwise; prompt `i`'s seed is `seed + i`.
    public struct Defaults: Sendable {
        /// Tokens to generate at most, and the stop string (nil: none).
        public var maxTokens: Int, stop: String?
        /// Sampling: temperature (0: greedy), top-k (0: all), top-p (1: all), base seed.
        public var temperature: Float, topK: Int, topP: Float, seed: UInt64

        /// The given settings.
        public init(maxTokens: Int, stop: String?, temperature: Float, topK: Int, topP: Float, seed: UInt64) {
            (self.maxTokens, self.stop, self.temperature, self.topK, self.topP, self.seed) = (maxTokens, stop, temperature, topK, topP, seed)
        }
    }

    /// One finished prompt, written as a JSON line.
    public struct Completion: Sendable, Equatable, Encodable {
        /// The prompt's line number from 0, and its text.
        public let index: Int, prompt: String
        /// The generated text (up to, not including, the stop string when one ended it).
        public let completion: String
        /// Tokens generated (the stop string's included).
        public let tokens: Int
        /// `stop` (the stop string appeared) or `length` (the budget ran out).
        public let finish: String
    }

    /// The prompts of a prompts file's text: one per non-empty line.
    ///
    /// - Throws: `TrainingError` naming the line of an unreadable JSON object or an out-of-range value.
    public static func prompts(in text: String) throws -> [Prompt] {
        var prompts: [Prompt] = []
        for (number, line) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() where !line.isEmpty {
            let prompt: Prompt
            if line.hasPrefix("{") {
                do {
                    prompt = try JSONDecoder().decode(Prompt.self, from: Data(line.utf8))
                } catch {
                    throw TrainingError("prompts line \(number + 1): not a JSON object with a \"prompt\" string (\(error))")
                }
                if let budget = prompt.maxTokens, budget < 1 {
                    throw TrainingError("prompts line \(number + 1): max_tokens must be at least 1, got \(budget)")
                }
            } else {
                prompt = Prompt(prompt: unescaped(String(line)))
            }
            prompts.append(prompt)
        }
        return prompts
    }

    /// `\n` as a newline and `\\` as a backslash; any other character as itself.
    static func unescaped(_ line: String) -> String {
        var out = "", escaping = false
        for character in line {
            if escaping {
                out.append(character == "n" ? "\n" : character)
                escaping = false
            } else if character == "\\" {
                escaping = true
            } else {
                out.append(character)
            }
        }
        return escaping ? out + "\\" : out
    }

    /// Completes `prompts` in batches of `batchSize` (in file order), calling `done` with each
    /// batch's completions as they finish. Each prompt is prefilled in chunks of `prefillChunk`
    /// tokens (nil: the whole prompt in one call, the parallel forward). `placement` is where the
    /// model is (the memory each batch is checked against).
    ///
    /// - Throws: `ConfigurationError` when a batch would not fit in memory.
    public static func run(_ prompts: [Prompt], model: LanguageModel, tokenizer: any Tokenizer, defaults: Defaults,
                           batchSize: Int, prefillChunk: Int? = 512, placement: Placement = .cpu,
                           done: ([Completion]) -> Void) throws {
        require(batchSize >= 1, "BatchGeneration.run: batchSize must be at least 1, got \(batchSize)")
        var start = 0
        while start < prompts.count {
            let indices = Array(start..<min(start + batchSize, prompts.count))
            let tokens = indices.map { tokenizer.encode(prompts[$0].prompt) }
            let budgets = indices.map { prompts[$0].maxTokens ?? defaults.maxTokens }
            let longest = zip(tokens, budgets).map { $0.count + $1 }.max() ?? 0
            try model.configuration.checkInference(batch: indices.count, positions: longest, on: placement)
            let requests = indices.enumerated().map { k, i in
                GenerationRequest(prompt: tokens[k], maxTokens: budgets[k], sampler: TokenSampler(
                    temperature: defaults.temperature, topK: defaults.topK, topP: defaults.topP,
                    seed: prompts[i].seed ?? defaults.seed &+ UInt64(i)))
            }
            let stops = indices.map { prompts[$0].stop ?? defaults.stop }
            var decoders = indices.map { _ in StreamingDecoder(tokenizer: tokenizer) }
            var texts = [String](repeating: "", count: indices.count)
            let chunk = prefillChunk ?? max(1, tokens.map(\.count).max() ?? 1)
            let generated = model.generate(requests, prefillChunk: chunk) { k, produced in
                texts[k] += decoders[k].append(produced.last!)
                return stops[k].map { !$0.isEmpty && texts[k].contains($0) } ?? false
            }
            done(indices.enumerated().map { k, i in
                let text = texts[k] + decoders[k].finish()
                let cut = stops[k].flatMap { $0.isEmpty ? nil : text.range(of: $0) }
                return Completion(index: i, prompt: prompts[i].prompt, completion: cut.map { String(text[..<$0.lowerBound]) } ?? text,
                                  tokens: generated[k].count, finish: cut == nil ? "length" : "stop")
            })
            start += batchSize
        }
    }
}

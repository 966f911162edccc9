import ArgumentParser
import Foundation
import PhalanxData
import PhalanxModels
import PhalanxTraining

struct GenerateCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "generate",
        abstract: "Generate text from a checkpoint, streaming it as it is produced.",
        discussion: """
        The prompt is prefilled in chunks, then each token is one decode step: Phalanx layers \
        carry a constant-size recurrence state, attention layers a key/value cache (a fixed ring \
        for sliding-window attention).
        """)

    @Option(help: "Checkpoint file (a run's checkpoint.safetensors).") var checkpoint: String
    @Option(help: "Prompt text.") var prompt: String?
    @Option(help: "File whose text is the prompt (for long prompts).") var promptFile: String?
    @Option(help: "Tokens to generate at most.") var maxTokens = 400
    @Option(help: "Sampling temperature (0: greedy).") var temperature: Float = 0.8
    @Option(help: "Keep only the k most likely tokens (0: all).") var topK = 0
    @Option(help: "Nucleus sampling: keep the most likely tokens up to this probability (1: all).") var topP: Float = 0.95
    @Option(help: "Stop when the generated text contains this string.") var stop: String?
    @Option(help: "Seed of the sampler.") var seed: UInt64 = 0

    func validate() throws {
        guard prompt == nil || promptFile == nil else { throw ValidationError("give --prompt or --prompt-file, not both.") }
        guard maxTokens >= 1 else { throw ValidationError("--max-tokens must be at least 1; got \(maxTokens).") }
        guard temperature >= 0 && temperature.isFinite else { throw ValidationError("--temperature must be finite and at least 0 (0: greedy); got \(temperature).") }
        guard topK >= 0 else { throw ValidationError("--top-k must not be negative; got \(topK).") }
        guard topP > 0 && topP <= 1 else { throw ValidationError("--top-p must be in (0, 1]; got \(topP).") }
    }

    func run() throws {
        let (model, _, state) = try TrainingCheckpoint.load(from: URL(fileURLWithPath: checkpoint))
        let tokenizer = try loadTokenizer(from: state.tokenizer, origin: checkpoint)
        let text = try promptFile.map { try String(contentsOfFile: $0, encoding: .utf8) } ?? prompt ?? "\n"
        let promptTokens = tokenizer.encode(text)
        do {
            try model.configuration.checkInference(batch: 1, positions: promptTokens.count + min(maxTokens, Int.max - promptTokens.count))
        } catch {
            throw ValidationError("--max-tokens \(maxTokens) after a prompt of \(promptTokens.count) tokens: \(error)")
        }
        var sampler = TokenSampler(temperature: temperature, topK: topK, topP: topP, seed: seed)
        var decoder = StreamingDecoder(tokenizer: tokenizer)
        var generated = ""
        print(text, terminator: "")
        fflush(nil)
        _ = model.generate(prompt: promptTokens, maxTokens: maxTokens, sampler: &sampler) { token in
            let piece = decoder.append(token)
            print(piece, terminator: "")
            fflush(nil)
            generated += piece
            if let stop, generated.contains(stop) { return false }
            return true
        }
        print(decoder.finish())
    }
}

import ArgumentParser
import Foundation
import PhalanxData
import PhalanxLayers
import PhalanxModels
import PhalanxTraining

struct GenerateCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "generate",
        abstract: "Generate text from a checkpoint, streaming it as it is produced, or complete a file of prompts.",
        discussion: """
        The prompt is prefilled in chunks, then each token is one decode step: Phalanx layers \
        carry a constant-size recurrence state, attention layers a key/value cache (a fixed ring \
        for sliding-window attention). With --prompts FILE, every line is a prompt (a plain line, \
        with \\n for a newline, or a JSON object {"prompt": ..., "max_tokens": ..., "stop": ..., \
        "seed": ...}); --batch-size prompts of any lengths are decoded together, each stopping on \
        its own budget or stop string, and each completion is written as a JSON line {"index", \
        "prompt", "completion", "tokens", "finish": "stop" or "length"} to --out (default: the \
        standard output). Prompt i samples with seed --seed + i, so its completion is the one it \
        gets alone. With --device cuda the model decodes on the GPU (its states and key/value \
        caches on the device; sampling on the host from the last position's logits).
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
    @Option(help: "File of prompts to complete, one per line (or JSON lines); see the discussion.") var prompts: String?
    @Option(help: "With --prompts: the JSON-lines file to write (default: the standard output).") var out: String?
    @Option(help: "With --prompts: prompts decoded together.") var batchSize = 16
    @Option(help: "Prompt tokens per prefill call (default: 512 on the CPU; with --device cuda, the whole prompt in one parallel pass).")
    var prefillChunk: Int?
    @OptionGroup var device: DeviceOptions

    func validate() throws {
        guard prompt == nil || promptFile == nil else { throw ValidationError("give --prompt or --prompt-file, not both.") }
        guard maxTokens >= 1 else { throw ValidationError("--max-tokens must be at least 1; got \(maxTokens).") }
        guard temperature >= 0 && temperature.isFinite else { throw ValidationError("--temperature must be finite and at least 0 (0: greedy); got \(temperature).") }
        guard topK >= 0 else { throw ValidationError("--top-k must not be negative; got \(topK).") }
        guard topP > 0 && topP <= 1 else { throw ValidationError("--top-p must be in (0, 1]; got \(topP).") }
        guard prompts == nil || (prompt == nil && promptFile == nil) else {
            throw ValidationError("--prompts completes a file of prompts: give it without --prompt or --prompt-file.")
        }
        guard (prefillChunk ?? 1) >= 1 else { throw ValidationError("--prefill-chunk must be at least 1; got \(prefillChunk!).") }
        guard batchSize >= 1 else { throw ValidationError("--batch-size must be at least 1; got \(batchSize).") }
        guard out == nil || prompts != nil else { throw ValidationError("--out writes the completions of --prompts.") }
    }

    func run() throws {
        let (model, _, state) = try TrainingCheckpoint.load(from: URL(fileURLWithPath: checkpoint))
        let tokenizer = try loadTokenizer(from: state.tokenizer, origin: checkpoint)
        let placement = try device.placement()
        model.move(to: placement.device, compute: placement.compute)
        if let prompts {
            try complete(prompts, model: model, tokenizer: tokenizer, placement: placement)
            try placement.device.cuda?.checkFailure()
            return
        }
        let text = try promptFile.map { try String(contentsOfFile: $0, encoding: .utf8) } ?? prompt ?? "\n"
        let promptTokens = tokenizer.encode(text)
        do {
            try model.configuration.checkInference(batch: 1, positions: promptTokens.count + min(maxTokens, Int.max - promptTokens.count),
                                                   on: placement)
        } catch {
            throw ValidationError("--max-tokens \(maxTokens) after a prompt of \(promptTokens.count) tokens: \(error)")
        }
        var sampler = TokenSampler(temperature: temperature, topK: topK, topP: topP, seed: seed)
        var decoder = StreamingDecoder(tokenizer: tokenizer)
        var generated = ""
        print(text, terminator: "")
        fflush(nil)
        let chunk = prefillChunk ?? (device.onGPU ? max(1, promptTokens.count) : 512)
        _ = model.generate(prompt: promptTokens, maxTokens: maxTokens, sampler: &sampler, prefillChunk: chunk) { token in
            let piece = decoder.append(token)
            print(piece, terminator: "")
            fflush(nil)
            generated += piece
            if let stop, generated.contains(stop) { return false }
            return true
        }
        print(decoder.finish())
        try placement.device.cuda?.checkFailure()
    }

    /// `--prompts`: every prompt's completion as a JSON line, written as each batch finishes.
    private func complete(_ path: String, model: LanguageModel, tokenizer: any Tokenizer, placement: Placement) throws {
        let text: String
        do { text = try String(contentsOfFile: path, encoding: .utf8) } catch {
            throw ValidationError("--prompts: cannot read \(path): \(error.localizedDescription)")
        }
        let list: [BatchGeneration.Prompt]
        do { list = try BatchGeneration.prompts(in: text) } catch let error as TrainingError {
            throw ValidationError("--prompts \(path): \(error)")
        }
        let output: FileHandle
        if let out {
            guard FileManager.default.createFile(atPath: out, contents: nil) else { throw ValidationError("--out: cannot create \(out)") }
            output = try FileHandle(forWritingTo: URL(fileURLWithPath: out))
        } else {
            output = .standardOutput
        }
        let defaults = BatchGeneration.Defaults(maxTokens: maxTokens, stop: stop, temperature: temperature, topK: topK, topP: topP,
                                                seed: seed)
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        var written = 0
        do {
            try BatchGeneration.run(list, model: model, tokenizer: tokenizer, defaults: defaults, batchSize: batchSize,
                                    prefillChunk: prefillChunk ?? (device.onGPU ? nil : 512), placement: placement) { completions in
                for completion in completions {
                    guard let line = try? encoder.encode(completion) else { continue }
                    output.write(line + Data("\n".utf8))
                }
                written += completions.count
                if out != nil { FileHandle.standardError.write(Data("\(written)/\(list.count) prompts completed\n".utf8)) }
            }
        } catch let error as ConfigurationError {
            throw ValidationError("--batch-size \(batchSize) with these prompts and --max-tokens: \(error)")
        }
    }
}

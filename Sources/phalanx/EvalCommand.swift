import ArgumentParser
import Foundation
import PhalanxData
import PhalanxModels
import PhalanxTraining

struct EvalCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "eval",
        abstract: "Loss, perplexity and bits per byte of a checkpoint on held-out text, at several context lengths.")

    @Option(help: "Checkpoint file (a run's checkpoint.safetensors).") var checkpoint: String
    @Option(help: "Text file to score (default: the validation split the run was trained with).") var data: String?
    @Option(parsing: .upToNextOption, help: "Context lengths to evaluate at.") var contexts: [Int] = [64, 256, 1024]
    @Option(help: "Windows per context length (0: the whole split).") var windows = 64
    @Option(help: "Windows per forward pass.") var batchSize = 8
    @Option(parsing: .upToNextOption,
            help: "Also the loss by position within the window, in bands cut after these positions (64 512: positions 1-64, 65-512, 513 to the context).")
    var positionBands: [Int] = []
    @OptionGroup var device: DeviceOptions

    func validate() throws {
        guard !contexts.isEmpty, contexts.allSatisfy({ $0 >= 1 }) else { throw ValidationError("--contexts must be at least 1 each; got \(contexts).") }
        guard windows >= 0 else { throw ValidationError("--windows must be at least 0 (0: the whole split); got \(windows).") }
        guard batchSize >= 1 else { throw ValidationError("--batch-size must be at least 1; got \(batchSize).") }
        guard positionBands.allSatisfy({ $0 >= 1 }) else { throw ValidationError("--position-bands must be positions of at least 1; got \(positionBands).") }
    }

    func run() throws {
        let url = URL(fileURLWithPath: checkpoint)
        let (model, _, state) = try TrainingCheckpoint.load(from: url)
        let tokenizer = try loadTokenizer(from: state.tokenizer, origin: checkpoint)
        let split: TokenSplit
        if let data {
            let text = try String(contentsOfFile: data, encoding: .utf8)
            split = TokenSplit(tokenizer.encode(text))
        } else {
            split = try TokenFile(contentsOf: URL(fileURLWithPath: state.dataPath)).validation
        }
        let placement = try device.placement()
        for context in contexts {
            do {
                try model.configuration.checkInference(batch: batchSize, positions: context, on: placement)
            } catch {
                throw ValidationError("--batch-size \(batchSize) x --contexts \(context): \(error)")
            }
        }
        model.move(to: placement.device, compute: placement.compute)
        print("checkpoint: step \(state.step), \(model.configuration.pattern) x \(model.configuration.depth), \(split.count) tokens to score")
        print("  context   windows   loss (nats/token)   perplexity   bits/byte")
        var byPosition: [(context: Int, losses: [Double])] = []
        for context in contexts {
            let result = Evaluation.evaluate(model, split: split, tokenizer: tokenizer, contextLength: context, batchSize: batchSize,
                                             maxWindows: windows == 0 ? nil : windows, byPosition: !positionBands.isEmpty)
            guard result.tokens > 0 else {
                print(String(format: "  %7d   (the text is shorter than one window)", context))
                continue
            }
            guard result.loss.isFinite else {
                throw ValidationError("the loss at context \(context) is \(result.loss): the model's outputs overflow on this text")
            }
            print(String(format: "  %7d   %7d   %17.4f   %10.3f   %9.4f", context, result.tokens / context, result.loss,
                         result.perplexity, result.bitsPerByte))
            if let losses = result.lossByPosition { byPosition.append((context, losses)) }
        }
        guard !byPosition.isEmpty else { return }
        print("loss (nats/token) by position within the window")
        for (context, losses) in byPosition {
            let bands = Evaluation.bands(losses, edges: positionBands)
            print("  context \(context): " + bands.map { String(format: "%d-%d %.4f", $0.positions.lowerBound, $0.positions.upperBound, $0.loss) }
                .joined(separator: "   "))
        }
    }
}

struct InspectCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "inspect",
        abstract: "Show what a checkpoint holds: model configuration, parameters, training state.")

    @Argument(help: "Checkpoint file.") var checkpoint: String
    @Flag(help: "List every tensor with its shape.") var tensors = false

    func run() throws {
        let url = URL(fileURLWithPath: checkpoint)
        let (model, optimizer, state) = try TrainingCheckpoint.load(from: url)
        let c = model.configuration
        print("checkpoint \(checkpoint)")
        print("model: pattern \(c.pattern) over \(c.depth) blocks (\(model.mixerKinds.map { String($0.rawValue) }.joined())), dim \(c.dim), vocabulary \(c.vocabulary)")
        print("  attention \(c.attentionHeads) x \(c.attentionHeadDim) (kv \(c.attentionKVHeads)), window \(c.window); Phalanx kv heads \(c.phalanxKVHeads), gate scale \(c.gateScale); MLP \(c.mlpHidden); tied head \(c.tiedEmbedding)")
        print("  \(model.parameterCount) parameters in \(model.parameters.count) tensors")
        let t = state.configuration
        print("training: step \(state.step) of \(t.steps), \(state.tokensSeen) tokens seen, \(formatDuration(state.elapsedSeconds)) elapsed, optimizer step \(optimizer.step)")
        print("  batch \(t.batchSize) x context \(t.contextLength) x accumulation \(t.accumulation); lr \(t.peakLearningRate), warm-up \(t.warmupSteps), weight decay \(t.weightDecay), clip \(t.gradientClip), dropout \(t.dropout ?? 0)")
        if let last = state.trainLosses.last { print(String(format: "  last train loss %.4f (step %d)", last.loss, last.step)) }
        if let last = state.validationLosses.last { print(String(format: "  last validation loss %.4f (step %d)", last.loss, last.step)) }
        print("data: \(state.dataPath)")
        if tensors {
            for p in model.parameters { print("  \(p.name) \(p.value.shape)") }
        }
    }
}

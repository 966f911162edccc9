import Foundation
import PhalanxData
import PhalanxModels
import PhalanxRuntime
import PhalanxTraining
import Testing

@Suite("Loss by position within the context")
struct PositionLossTests {
    let model = try! LanguageModel(tinyConfiguration(), seed: 4)
    var split: TokenSplit {
        var rng = SeededGenerator(seed: 8)
        return TokenSplit((0..<(5 * 24 + 1)).map { _ in Int32.random(in: 0..<256, using: &rng) })
    }

    @Test("each position's loss is logsumexp minus the target logit, and their mean is the model's loss")
    func tokenLossesAverageToTheLoss() {
        var rng = SeededGenerator(seed: 2)
        let tokens = (0..<(2 * 12)).map { _ in Int32.random(in: 0..<256, using: &rng) }
        let targets = (0..<(2 * 12)).map { _ in Int32.random(in: 0..<256, using: &rng) }
        let cache = model.forward(tokens: tokens, batch: 2, length: 12)
        let losses = model.tokenLosses(cache, targets: targets)
        let logits = cache.logits.readOnly
        let row = 5, z = (0..<256).map { Double(logits[row * 256 + $0]) }
        let expected = Foundation.log(z.map { Foundation.exp($0) }.reduce(0, +)) - z[Int(targets[row])]
        #expect(abs(losses[row] - expected) < 1e-9)
        let mean = losses.reduce(0, +) / Double(losses.count)
        #expect(abs(mean - Double(model.loss(cache, targets: targets))) < 1e-5)
    }

    @Test("the mean over positions equals the evaluation's loss; bands average their positions")
    func positionsAndBands() {
        let result = Evaluation.evaluate(model, split: split, tokenizer: ByteTokenizer(), contextLength: 24, batchSize: 2,
                                         byPosition: true)
        let byPosition = result.lossByPosition ?? []
        let whole = Evaluation.evaluate(model, split: split, tokenizer: ByteTokenizer(), contextLength: 24, batchSize: 2)
        #expect(whole.lossByPosition == nil)
        #expect(abs(result.loss - whole.loss) < 1e-5)
        #expect(byPosition.count == 24)
        #expect(abs(byPosition.reduce(0, +) / 24 - whole.loss) < 1e-5)
        let bands = Evaluation.bands(byPosition, edges: [4, 10, 99])
        #expect(bands.map(\.positions) == [1...4, 5...10, 11...24])
        #expect(abs(bands[1].loss - byPosition[4..<10].reduce(0, +) / 6) < 1e-12)
    }
}

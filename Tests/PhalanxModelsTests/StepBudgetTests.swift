import Foundation
import PhalanxModels
import PhalanxTraining
import Testing

@Suite("Sizing a run by a time budget")
struct StepBudgetTests {
    func plan() -> TrainingRun.Plan {
        var training = TrainingConfiguration()
        (training.batchSize, training.contextLength) = (2, 16)
        let model = ModelConfiguration(dim: 32, depth: 2, pattern: "PA", attentionHeads: 2, mlpHidden: 48)
        return TrainingRun.Plan(model: model, training: training, files: [], seed: 1)
    }

    @Test("the step count is what fits in nine tenths of the budget at the measured step time, and at least one")
    func fitsTheBudget() throws {
        let (steps, perStep) = try plan().stepsFitting(seconds: 1)
        #expect(perStep > 0)
        #expect(steps >= 1)
        #expect(steps == max(1, Int(0.9 / perStep)))
        let (tiny, _) = try plan().stepsFitting(seconds: 1e-9)
        #expect(tiny == 1)
    }

    @Test("a budget that is not positive and finite is refused, naming --minutes' field", arguments: [0, -1, Double.nan, .infinity])
    func refusesBadBudgets(seconds: Double) {
        #expect { try plan().stepsFitting(seconds: seconds) } throws: { ($0 as? TrainingError)?.field == "minutes" }
    }
}

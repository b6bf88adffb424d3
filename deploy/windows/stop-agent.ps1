<#
.SYNOPSIS
    Stop the trainfleet agent's Scheduled Task gently: create its stop file, wait for the
    agent to drain (running jobs finish or are handed back to the fleet) and exit; only
    after DrainSeconds end the task hard (Stop-ScheduledTask terminates the process: its
    trainers die with their Job Objects and their jobs' leases lapse, so other agents take
    them over).
#>
[CmdletBinding()]
param(
    [string] $TaskName = 'trainfleet-agent',
    [string] $WorkDir = (Join-Path $env:ProgramData 'trainfleet\agent'),
    # Longer than the fleet's drain timeout plus the trainers' stop grace.
    [int] $DrainSeconds = 120
)

Set-StrictMode -Version Latest
$ErrorActionPreference = 'Stop'

$task = Get-ScheduledTask -TaskName $TaskName -ErrorAction SilentlyContinue
if ($null -eq $task) {
    Write-Host "--- no scheduled task $TaskName"
    exit 0
}
if ($task.State -ne 'Running') {
    Write-Host "--- $TaskName is not running ($($task.State))"
    exit 0
}
$stopFile = Join-Path $WorkDir 'agent.stop'
New-Item -ItemType File -Force -Path $stopFile | Out-Null
Write-Host "--- asked the agent to drain ($stopFile); waiting up to $DrainSeconds s"
$deadline = (Get-Date).AddSeconds($DrainSeconds)
while ((Get-Date) -lt $deadline) {
    if ((Get-ScheduledTask -TaskName $TaskName).State -ne 'Running') {
        Write-Host "--- the agent has stopped"
        exit 0
    }
    Start-Sleep -Seconds 1
}
Write-Warning "the agent did not stop within $DrainSeconds s: ending the task"
Stop-ScheduledTask -TaskName $TaskName
Remove-Item -LiteralPath $stopFile -Force -ErrorAction SilentlyContinue

#Requires -RunAsAdministrator
<#
.SYNOPSIS
    Remove the trainfleet agent's Scheduled Task: stop the agent gently first
    (stop-agent.ps1: it drains and hands its jobs back), then unregister the task.
    The work dir (trainer outputs, agent.log) is kept unless -RemoveWorkDir.
#>
[CmdletBinding()]
param(
    [string] $TaskName = 'trainfleet-agent',
    [string] $WorkDir = (Join-Path $env:ProgramData 'trainfleet\agent'),
    [int] $DrainSeconds = 120,
    [switch] $RemoveWorkDir
)

Set-StrictMode -Version Latest
$ErrorActionPreference = 'Stop'

if (-not (Get-ScheduledTask -TaskName $TaskName -ErrorAction SilentlyContinue)) {
    Write-Host "--- no scheduled task ${TaskName}: nothing to remove"
} else {
    & (Join-Path $PSScriptRoot 'stop-agent.ps1') -TaskName $TaskName -WorkDir $WorkDir -DrainSeconds $DrainSeconds
    Unregister-ScheduledTask -TaskName $TaskName -Confirm:$false
    Write-Host "--- unregistered $TaskName"
}
if ($RemoveWorkDir -and (Test-Path -LiteralPath $WorkDir)) {
    Remove-Item -LiteralPath $WorkDir -Recurse -Force
    Write-Host "--- removed $WorkDir"
}
